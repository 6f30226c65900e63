"""families/autograd_forward.py: autograd-safe forwards of ComfyUI's own Flux and Wan classes.

* equivalence: the training forward equals the model's own forward (also with RoPE options);
* gradients: autograd through it agrees with central finite differences in float64 on entries of
  EVERY parameter tensor of tiny Flux, Flux-2-style (global modulation), Wan t2v and Wan i2v
  models (2 blocks each, so first and last block), and on inputs; a plain ``backward()``
  through Flux's own forward raises the in-place error (the reason the module exists);
* nothing is modified or created: parameters, their identity and the caller's options.
"""

import copy

import pytest
import torch

import tiny_models

ROPE_COARSE = {"scale_x": 2.0, "scale_y": 2.0, "shift_x": 0.5, "shift_y": 0.5}


@pytest.fixture(scope="module")
def tf(pack):
    from elastic_tokens.families import autograd_forward as train_forward

    return train_forward


def _random_init(model, seed):
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(tiny_models.random_weights(shapes, seed=seed))
    # norms/scales 1 and biases 0 would leave those gradients degenerate: perturb every tensor
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _flux2_style():
    """Flux class with the Flux 2 switches: global modulation, SiLU-gated MLP, no biases, 4 axes."""
    import comfy.ldm.flux.model
    import comfy.ops

    config = dict(
        in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=tiny_models.TEXT_DIM,
        hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 8, 8, 8],
        theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True,
        mlp_silu_act=True, ops_bias=False)
    m = comfy.ldm.flux.model.Flux(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
                                  **tiny_models.flux_kwargs(config, {"txt_ids_dims": [3]}))
    return _random_init(m, seed=11)


def _flux_yak():
    """FLUX.1-style with ComfyUI 0.33's gated ``yak_mlp`` (double blocks: YakMLP; single blocks: a
    SiLU-gated MLP stream); None where ``FluxParams`` has no such field (0.3.75)."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.ops

    if "yak_mlp" not in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        return None
    config = dict(tiny_models.TINY_FLUX, depth=1, depth_single_blocks=1, yak_mlp=True)
    m = comfy.ldm.flux.model.Flux(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
                                  **tiny_models.flux_kwargs(config))
    return _random_init(m, seed=13)


def _wan_i2v():
    """Wan 2.1 I2V (36 input channels: noisy latent + mask + image latent, CLIP features)."""
    import comfy.ldm.wan.model
    import comfy.ops

    m = comfy.ldm.wan.model.WanModel(
        model_type="i2v", patch_size=(1, 2, 2), in_dim=36, dim=128, ffn_dim=256, freq_dim=256,
        text_dim=tiny_models.TEXT_DIM, out_dim=16, num_heads=2, num_layers=2, cross_attn_norm=True,
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return _random_init(m, seed=12)


def _inputs(kind, dtype=torch.float32):
    """Positional inputs for ``forward(x, timestep, context, ...)``: batch 2 for all but i2v."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if kind in ("flux", "flux_yak"):  # 4x3 tokens at patch 2, y, guidance
        return (r(2, 16, 8, 6), torch.tensor([0.3, 0.8], dtype=dtype), r(2, 5, tiny_models.TEXT_DIM),
                r(2, tiny_models.TINY_FLUX["vec_in_dim"]), torch.tensor([3.5, 2.0], dtype=dtype))
    if kind == "flux2":  # patch 1, no y
        return (r(2, 16, 4, 3), torch.tensor([0.3, 0.8], dtype=dtype), r(2, 5, tiny_models.TEXT_DIM),
                None, torch.tensor([3.5, 2.0], dtype=dtype))
    if kind == "wan":
        return r(2, 16, 2, 4, 6), torch.tensor([300.0, 800.0], dtype=dtype), r(2, 5, tiny_models.TEXT_DIM)
    assert kind == "wan_i2v"  # clip_fea: (B, image tokens, 1280)
    return (r(1, 36, 2, 4, 4), torch.tensor([500.0], dtype=dtype), r(1, 5, tiny_models.TEXT_DIM),
            r(1, 4, 1280))


@pytest.fixture(scope="module")
def models(tiny_flux, tiny_wan):
    """kind -> a float32 diffusion model (the shared fixtures' are only read, never trained)."""
    return {"flux": tiny_flux.model.diffusion_model, "flux2": _flux2_style(), "flux_yak": _flux_yak(),
            "wan": tiny_wan.model.diffusion_model, "wan_i2v": _wan_i2v()}


def _model(models, kind):
    if models[kind] is None:
        pytest.skip(f"this ComfyUI has no {kind} variant of its classes")
    return models[kind]


def _call(fn, model, kind, inputs, **kw):
    if kind.startswith("flux"):
        x, t, ctx, y, guidance = inputs
        return fn(model, x, t, ctx, y=y, guidance=guidance, **kw)
    return fn(model, *inputs[:3], clip_fea=inputs[3] if len(inputs) > 3 else None, **kw)


def _own_forward(model, *args, **kw):
    return model(*args, **kw)


# --------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("kind", ["flux", "flux2", "flux_yak", "wan", "wan_i2v"])
def test_equals_the_models_own_forward_also_with_rope_options(tf, models, kind):
    model, inputs = _model(models, kind), _inputs(kind)
    fn = tf.training_forward(model).func
    assert fn is (tf.flux_forward if kind.startswith("flux") else tf.wan_forward)
    with torch.no_grad():
        outs = {}
        for name, opts in (("native", None), ("coarse", {"rope_options": dict(ROPE_COARSE)})):
            ref = _call(_own_forward, model, kind, inputs, transformer_options=copy.deepcopy(opts or {}))
            out = _call(fn, model, kind, inputs, transformer_options=opts)
            assert out.shape == ref.shape == (inputs[0].shape[0], 16, *inputs[0].shape[2:])
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            outs[name] = out
    assert not torch.allclose(outs["native"], outs["coarse"], atol=1e-4)  # the options were honoured


def test_caller_options_untouched_and_existing_block_patches_still_run(tf, models):
    model, inputs = models["flux"], _inputs("flux")
    calls = []

    def patch(args, extra):  # a user's block-replace patch around the original block
        calls.append(args["transformer_options"]["block_index"])
        out = extra["original_block"](args)
        return {**out, "img": 0.5 * out["img"]}

    opts = {"patches_replace": {"dit": {("double_block", 1): patch}}, "rope_options": dict(ROPE_COARSE)}
    before = copy.deepcopy(opts)
    with torch.no_grad():
        ref = _call(_own_forward, model, "flux", inputs, transformer_options=copy.deepcopy(opts))
        out = _call(tf.flux_forward, model, "flux", inputs, transformer_options=opts)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert calls == [1, 1] and opts == before


def test_other_classes_get_a_clear_error(tf, tiny_flux):
    with pytest.raises(tf.UnsupportedTrainingModelError, match="model_patcher.model.diffusion_model"):
        tf.training_forward(tiny_flux.model)  # the BaseModel wrapper, not the diffusion model
    with pytest.raises(tf.UnsupportedTrainingModelError, match="only ComfyUI's Flux"):
        tf.training_forward(torch.nn.Linear(2, 2))
    with pytest.raises(tf.UnsupportedTrainingModelError, match="WanModel"):
        tf.wan_forward(tiny_flux.model.diffusion_model, None, None, None)


# --------------------------------------------------------------------------- gradients

def _float64(model, monkeypatch):
    """A float64 copy. Two ComfyUI spots compute in float32 whatever the model dtype; made
    float64 here so finite differences are meaningful (both are constants of the parameters):
    RoPE tables (``rope`` returns float32 and ``apply_rope1`` casts q/k to it) and Wan's
    ``patch_embedding(x.float())`` (its input only, a float32-exact value: run in float64)."""
    import comfy.ldm.flux.layers

    rope = comfy.ldm.flux.layers.rope
    monkeypatch.setattr(comfy.ldm.flux.layers, "rope", lambda *a: rope(*a).double())
    # a trainable copy: the session's shared tiny models may come back from ComfyUI's patch /
    # unpatch cycle (other tests sample with weight patches) with requires_grad off
    m = copy.deepcopy(model).double().requires_grad_(True)
    if hasattr(m, "patch_embedding"):
        conv = m.patch_embedding
        conv.forward = lambda inp: type(conv).forward(conv, inp.double())
    return m


@pytest.mark.parametrize("kind", ["flux", "flux2", "flux_yak", "wan", "wan_i2v"])
def test_gradients_match_finite_differences_for_every_parameter_tensor(tf, models, kind, monkeypatch):
    model = _float64(_model(models, kind), monkeypatch)
    inputs = [None if v is None else v.to(torch.float64) for v in _inputs(kind)]
    if kind.startswith("flux"):
        opts = {"rope_options": dict(ROPE_COARSE)}  # as at a coarse patch step
        # Flux's own forward cannot be trained: its blocks add residuals in place (with RoPE in
        # plain torch ops, as ComfyUI's own training sets it where the flag exists: 0.33)
        import comfy.model_management

        if hasattr(comfy.model_management, "in_training"):
            monkeypatch.setattr(comfy.model_management, "in_training", True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _call(_own_forward, model, kind, inputs, transformer_options=copy.deepcopy(opts)).sum().backward()
        model.zero_grad(set_to_none=True)
        probed = {"x": 0, "context": 2}  # input tensors checked too (they carry no float32 cast)
    else:
        opts = {}  # Wan 0.3.75's own forward is out of place: wan_forward is it, checked here
        probed = {"context": 2, **({"clip_fea": 3} if kind == "wan_i2v" else {})}

    weight = torch.randn(_call(tf.training_forward(model).func, model, kind, inputs).shape,
                         generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss():
        return (_call(tf.training_forward(model).func, model, kind, inputs, transformer_options=opts) * weight).sum()

    tensors = dict(model.named_parameters())
    for name, i in probed.items():
        inputs[i] = inputs[i].clone().requires_grad_(True)
        tensors[f"input {name}"] = inputs[i]
    grads = dict(zip(tensors, torch.autograd.grad(loss(), list(tensors.values()))))

    h, gen, bad = 1e-4, torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for name, p in tensors.items():
            flat, g = p.view(-1), grads[name].reshape(-1)
            # the entry with the largest gradient and a random one
            for j in {int(g.abs().argmax()), int(torch.randint(flat.numel(), (1,), generator=gen))}:
                orig = flat[j].item()
                flat[j] = orig + h
                up = loss().item()
                flat[j] = orig - h
                down = loss().item()
                flat[j] = orig
                fd, ad = (up - down) / (2 * h), g[j].item()
                if abs(fd - ad) > 1e-5 * max(abs(fd), abs(ad)) + 1e-9:
                    bad.append(f"{name}[{j}]: autograd {ad:.8g} vs finite difference {fd:.8g}")
    assert not bad, "\n".join(bad)
    # every parameter tensor was probed; the tiny models have every kind of block, first and last
    kinds = {"flux": "img_in txt_in time_in vector_in guidance_in double_blocks.0 double_blocks.1 "
                     "single_blocks.0 single_blocks.1 final_layer",
             "flux2": "img_in txt_in time_in guidance_in double_stream_modulation_img double_stream_modulation_txt "
                      "single_stream_modulation double_blocks.0 double_blocks.1 single_blocks.0 single_blocks.1 "
                      "final_layer",
             "flux_yak": "img_in txt_in double_blocks.0.img_mlp.gate_proj double_blocks.0.img_mlp.down_proj "
                         "double_blocks.0.txt_mlp.up_proj single_blocks.0 final_layer",
             "wan": "patch_embedding text_embedding time_embedding time_projection blocks.0.self_attn "
                    "blocks.0.cross_attn blocks.0.ffn blocks.0.modulation blocks.0.norm3 blocks.1 head",
             "wan_i2v": "patch_embedding img_emb blocks.0.cross_attn.k_img blocks.1.cross_attn.v_img head"}[kind]
    assert all(any(n.startswith(k + ".") or n == k for n in tensors) for k in kinds.split())


# --------------------------------------------------------------------------- side effects

@pytest.mark.parametrize("kind", ["flux", "wan_i2v"])
def test_forward_and_backward_modify_no_parameter_and_create_none(tf, models, kind):
    model = copy.deepcopy(models[kind]).requires_grad_(True)  # see _float64 on requires_grad
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffers = dict(model.named_buffers())
    opts = {"rope_options": dict(ROPE_COARSE)}
    out = _call(tf.training_forward(model).func, model, kind, _inputs(kind), transformer_options=opts)
    out.square().mean().backward()
    assert dict(model.named_parameters()) == params  # same names, same tensor objects
    assert dict(model.named_buffers()) == buffers
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert opts == {"rope_options": ROPE_COARSE}


# --------------------------------------------------------------------------- the in-place guard

def test_blocks_may_add_into_their_streams_but_other_in_place_changes_still_raise(tf):
    """What makes ComfyUI's own blocks trainable (families/autograd_forward._protected): a block that
    adds into its input stream after a LayerNorm saved it gets the out-of-place gradient; any other
    saved tensor changed in place still raises, as autograd does without the hooks."""
    w = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def in_place(args):  # as Flux's blocks: norm(img) is saved, then img += ...
        img = args["img"]
        img += torch.nn.functional.layer_norm(img, (6,)) * w
        img += torch.tanh(torch.nn.functional.layer_norm(img, (6,)))
        return {"img": img}

    def out_of_place(args):
        img = args["img"]
        img = img + torch.nn.functional.layer_norm(img, (6,)) * w
        return {"img": img + torch.tanh(torch.nn.functional.layer_norm(img, (6,)))}

    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    grads = {}
    for name, block in (("ref", out_of_place), ("guarded", tf._protected(in_place, ("img",)))):
        out = block({"img": x * 1.0})["img"]
        grads[name] = torch.autograd.grad(out.square().sum(), (x, w))
    for a, b in zip(grads["ref"], grads["guarded"]):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # unguarded
        torch.autograd.grad(in_place({"img": x * 1.0})["img"].square().sum(), (x, w))

    def changes_a_saved_activation(args):  # not a stream: the guard must not hide this
        img = args["img"]
        h = img * w
        out = torch.tanh(h)  # saves its output
        out.mul_(2.0)
        return {"img": img + out}

    out = tf._protected(changes_a_saved_activation, ("img",))({"img": x * 1.0})["img"]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
