"""The Elastic Token Router as a planner: which image tokens of each step go through the blocks.

Each step inside the window (ComfyUI's percent_to_sigma of start/end, as EasyCache): every
image token of the native grid is scored from the sampler's own trajectory (kernels/token_scores:
``ras``, ``context`` or ``change``; or ``learned``: a trained router's predicted per-step drift on
the same two latents, ideas/drop/router_net.py, from the MODEL the "Load Token Router" node
attached it to, times the age of the token's cached output), scores are multiplied by the
starvation term, and the top ``budget`` share runs through the blocks (the runtime's token
path: positions travel with their tokens, text tokens always run); the rest are filled back (ideas/drop/fill.py). Ties in the
ordering go to the lower index, so at one step a lower budget's kept set is a subset of a
higher one's (elastic). Each sample of a batch gets its own kept set from its own scores (all
of its CFG branches share it); the count is the same for every sample.

Dense steps (every token computed, the cache renewed): the first step of the window (and the
first after any step the router did not see whole: outside the window, a coarse step of a patch
schedule), every ``refresh_every``-th step, and steps with no score yet (the scorers read the
last update, so a run's first step is dense). With ``fill = nearest`` a dense step needs no
capture and runs as the plain model.

With ``attend_skipped`` the computed tokens' self-attention also reads the skipped tokens' keys
and values from their last computed step (ideas/drop/attend.py); dense steps fill that cache.

Stacking: a coarse step of a Dynamic Patch Schedule (planned before the router, it sets the grid)
runs all its tokens; the router routes the native steps. Budget 1.0 or an empty window make the
router idle: the run is the plain model bit for bit.
"""

from __future__ import annotations

from collections import deque

import torch

from ...families import FamilyBinding
from ...kernels import token_scores as ks
from ...runtime.token_plan import StepInput, TokenPlan
from .attend import AttendSkipped, KVState
from .config import RouterConfig
from .fill import CacheFill, FillState, NearestFill
from .router_file import ROUTER_KEY, RouterFileError
from .router_net import router_features, token_grid


def missing_router_message() -> str:
    return ("Elastic Token Router: scorer 'learned' needs a trained token router on the model: put a "
            "'Load Token Router' node (a .safetensors router from scripts/train_patch_adapter.py --mode "
            "router, in models/elastic_tokens/) before this node, or pick another scorer (context).")


class RouterPlanner:
    idea = "drop"
    label = "Elastic Token Router"

    def __init__(self, config: RouterConfig):
        self.config = config

    def start(self, binding: FamilyBinding, options: dict, total_steps: int) -> "RouterRun":
        router = None
        if self.config.scorer == "learned" and not self.config.never_routes:
            router = options.get(ROUTER_KEY)
            if router is None:
                raise RouterFileError(missing_router_message())
        return RouterRun(self.config, binding, total_steps, router)


class RouterRun:
    """One sampling run of the router: recent latents, starvation counts, the fill caches."""

    def __init__(self, config: RouterConfig, binding: FamilyBinding, total_steps: int, router=None):
        self.config = config
        self.router = router                       # a TokenRouter (router_file.py) for scorer "learned"
        self.binding = binding
        self.total_steps = total_steps
        self.idle = config.never_routes
        self.needs_latent = not self.idle
        self.state = FillState()
        self.kv = KVState()
        self.kept: dict[int, torch.Tensor] = {}   # step -> kept indices of routed steps (on the device)
        self.kept_uncond: dict[int, torch.Tensor] = {}  # the same for the uncond branch, where lower
        self.dense_steps: list[int] = []
        self._history: deque = deque(maxlen=3)     # (sigma, float32 latent), oldest first
        self._skipped: torch.Tensor | None = None  # times each token was skipped in a row
        self._fresh = False                        # every token's output is in the cache
        self._since_dense = 0
        self._window: tuple[float, float] | None = None
        self._all: dict = {}

    # -- the step's plan -------------------------------------------------------------------
    def plan(self, step: StepInput, plan: TokenPlan) -> TokenPlan:
        cfg = self.config
        self._remember(step)
        if plan.factor != 1 or plan.keep is not None or plan.merge is not None:
            if plan.keep is not None or plan.merge is not None:
                step.notes.append("Elastic Token Router: another node already chose this step's tokens; "
                                  "the router left those steps to it")
            self._fresh = False
            return plan
        if not self._in_window(step):
            self._fresh = False
            return plan
        n = self.binding.grid_tokens(step.latent_shape)
        k = ks.budget_tokens(cfg.budget, n)
        k_uncond = ks.budget_tokens(cfg.uncond_share, n)
        if k_uncond >= n:  # (k >= k_uncond)
            return plan
        scores = self._scores(step)
        refresh = cfg.refresh_every > 0 and self._since_dense >= cfg.refresh_every - 1
        caches = cfg.fill == "cache" or cfg.attend_skipped
        if scores is None or refresh or (caches and not self._fresh):
            dense = self._dense(step, plan, n)
            # a lower uncond budget splits the branches' calls on every step of the window, dense
            # ones included, so each branch's K/V cache has the batch layout it is read with
            return dense.replace(uncond=dense) if k_uncond < k and dense is not plan else dense
        if self._skipped is None or self._skipped.shape != scores.shape or self._skipped.device != scores.device:
            self._skipped = torch.zeros_like(scores)
        if cfg.ages_scores:
            # the learned router predicts a token's velocity drift per step (RMS); its cached output is
            # skipped + 1 steps old, so the error of skipping it again grows about that much
            # (without it, regions the router ranks low, e.g. flat background, are refreshed only
            # by dense steps and the starvation term, and their stale outputs show)
            scores = scores * (self._skipped + 1)
        order = ks.rank(ks.starved(scores, self._skipped, cfg.starvation))
        keep = ks.select(scores, k, order) if k < n else None
        keep_uncond = ks.select(scores, k_uncond, order)  # the same ranking: a subset of keep
        self._skipped += 1
        self._skipped.scatter_(-1, keep if keep is not None else keep_uncond, 0)
        self._since_dense += 1
        self.kept[step.step] = keep if keep is not None else torch.arange(n, device=keep_uncond.device)
        step.scores.update(router_kept=k, router_tokens=n)
        routed = self._routed(step, plan, keep, n) if keep is not None else plan
        if k_uncond < k:
            self.kept_uncond[step.step] = keep_uncond
            step.scores.update(router_uncond_kept=k_uncond)
            routed = routed.replace(uncond=self._routed(step, plan, keep_uncond, n))
        return routed

    def _routed(self, step: StepInput, plan: TokenPlan, keep: torch.Tensor, n: int) -> TokenPlan:
        cfg = self.config
        if cfg.fill == "cache":
            fill = CacheFill(self.state, dense=False)
        else:
            fill = NearestFill(ks.nearest_source(keep, self.binding.grid(step.latent_shape)).to(keep.device))
        attention = AttendSkipped(self.kv, self.binding, keep, n, dense=False) if cfg.attend_skipped else None
        return plan.replace(keep=keep, fill=fill, attention=attention)

    def _dense(self, step: StepInput, plan: TokenPlan, n: int) -> TokenPlan:
        self._since_dense = 0
        if self._skipped is not None:
            self._skipped.zero_()
        self.dense_steps.append(step.step)
        step.scores.update(router_kept=n, router_tokens=n)
        cfg = self.config
        if cfg.fill != "cache" and not cfg.attend_skipped:
            return plan
        self._fresh = True
        latent = self._history[-1][1] if self._history else None
        device = latent.device if latent is not None else torch.device("cpu")
        every = self._all.get((n, device))
        if every is None:
            every = self._all[(n, device)] = torch.arange(n, device=device)
        fill = CacheFill(self.state, dense=True) if cfg.fill == "cache" else None
        attention = AttendSkipped(self.kv, self.binding, every, n, dense=True) if cfg.attend_skipped else None
        return plan.replace(keep=every, fill=fill, attention=attention)

    def _remember(self, step: StepInput) -> None:
        latent = step.latent()
        if latent is None:
            return
        z = latent.detach().to(torch.float32, copy=True)
        if self._history and self._history[-1][1].shape != z.shape:
            self._history.clear()
        self._history.append((float(step.sigma), z))

    def _in_window(self, step: StepInput) -> bool:
        cfg = self.config
        if self._window is None:
            to_sigma = step.percent_to_sigma
            if to_sigma is None:  # no model_sampling to ask: read the percents as step fractions
                n = max(step.total_steps, 1)
                return cfg.start_percent <= step.step / n < cfg.end_percent
            # compared in float32, as EasyCache compares ComfyUI's float32 sigmas with them
            self._window = tuple(float(torch.tensor(float(to_sigma(p)), dtype=torch.float32))
                                 for p in (cfg.start_percent, cfg.end_percent))
        start, end = self._window
        return end < step.sigma <= start

    def _scores(self, step: StepInput) -> torch.Tensor | None:
        hist = self._history
        if len(hist) < 2:
            return None
        b = self.binding
        p, tp = b.native_patch, b.temporal_patch
        (s_prev, z_prev), (s_cur, z_cur) = hist[-2], hist[-1]
        scorer = self.config.scorer
        if scorer == "context":
            scores = ks.context_scores(ks.x0_estimate(z_prev, z_cur, s_prev, s_cur), p, tp)
        elif scorer == "learned":
            feats = router_features(z_prev, z_cur, s_prev, s_cur, p, tp)
            logits = self.router.logits(feats, token_grid(z_cur.shape, p, tp))
            # the router's logit ~ log of the skip error (a squared velocity difference); halved, the
            # score is an RMS like ras's and context's, so the starvation rate means the same for all
            # (a softmax per sample).
            scores = torch.softmax(logits.clamp(-60.0, 60.0) / 2, dim=-1)
        elif scorer == "change" and len(hist) == 3:
            scores = ks.change_scores([z for _, z in hist], [s for s, _ in hist], p, tp)
        else:  # ras, and change until it has three latents
            scores = ks.update_scores(z_prev, z_cur, p, tp)
        # one selection per sample; a batch of one keeps the 1-d form (every row alike)
        return scores[0] if scores.shape[0] == 1 else scores

    # -- end of run --------------------------------------------------------------------------
    def finish(self, report) -> None:
        cfg = self.config
        grid, tokens = sum(report.step_grid_tokens), sum(report.step_tokens)
        skipped = 1.0 - tokens / grid if grid else 0.0
        text = (f"Elastic Token Router: {100 * skipped:.0f}% of image tokens skipped, "
                f"~{report.estimated_speedup:.1f}x (budget {cfg.budget:g}, {len(self.kept)} routed and "
                f"{len(self.dense_steps)} dense steps, scorer {cfg.scorer}, fill {cfg.fill}"
                + (f", uncond branch at budget {cfg.uncond_share:g}" if cfg.uncond_share < cfg.budget else "")
                + ")")
        if self.state.missing:
            text += (f", {self.state.missing} routed calls had no cached output for their branch "
                     f"(skipped tokens kept their input)")
        if cfg.attend_skipped:
            text += "; computed tokens attended to the skipped ones' cached keys/values"
            if self.kv.missing or self.kv.unexpected:
                text += (f" ({self.kv.missing} attention calls without a cache, {self.kv.unexpected} not "
                         f"recognised as self-attention: those ran without)")
        report.notes.append(text)
        self.kv.clear()
        self.state.clear()
        self._history.clear()
