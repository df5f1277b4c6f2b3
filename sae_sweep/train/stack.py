"""Stacked packs: same-shape members of a pack stepped as one batched SAE (`train.stack`).

A GPU leaves a small SAE's step mostly idle between kernel launches, so N members of the same
architecture and shape step faster as one SAE with weights stacked [N, ...]: batched matmuls, one
batched Adam over the stacked parameters (each elementwise pass covers every member), per-member
gradient clipping. Each member keeps its own lr (and schedule), l1_lambda (and warm-up), k, Adam
betas / eps, clip, budget, scale factor, dead-latent tracking, curves, checkpoints and pruning: the
stack computes its per-member losses, and the member's Trainer does all of its bookkeeping as for a
per-member step (Trainer.record_step). The result equals per-member training to float tolerance (not
bit for bit: batched kernels sum in another order).

Members' parameters, buffers and Adam moments are views into the stacked tensors while they are
stacked, so a checkpoint or a look at a member sees its current weights. A member that leaves (it
finished, was pruned or diverged) first gets its own copies back, then the stack is rebuilt from the
others: its exit does not disturb them.

What stacks (`stack_groups`): members of architecture relu, topk, batchtopk or matryoshka_batchtopk
(the TopK family in its dense formulation, AuxK and BatchTopK's inference threshold included;
Matryoshka with the same prefix widths) with the same architecture, d_in, hidden, precision and next
batch; jumprelu steps one by one. On CPU batched matmuls of small matrices ran slower than the same
GEMMs one by one (0.59x, benchmarks/README.md), so `train.stack=auto` stacks on CUDA only; `true`
forces it (the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sae_sweep.models.base import mse_per_token
from sae_sweep.models.batchtopk import BatchTopKSAE
from sae_sweep.models.matryoshka import MatryoshkaBatchTopKSAE
from sae_sweep.models.relu import ReluSAE
from sae_sweep.models.topk import TopKSAE, remove_radial_part
from sae_sweep.train.schedule import lr_multiplier, sparsity_coefficient

if TYPE_CHECKING:
    from sae_sweep.train.trainer import Trainer

# exactly these classes (a subclass may change the step: each one here has its own branch below)
STACKABLE = (ReluSAE, TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE)
BATCH_TOPK = (BatchTopKSAE, MatryoshkaBatchTopKSAE)
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def stacking_on(choice: Any, device: torch.device) -> bool:
    """Whether `train.stack` stacks on this device: auto = on CUDA only."""
    value = str(choice).lower()
    return value == "true" or (value == "auto" and device.type == "cuda")


def stack_key(m: Trainer) -> tuple[Any, ...] | None:
    """What members must share to step as one stack; None for one that cannot stack."""
    kind = type(m.sae)
    if kind not in STACKABLE or not stacking_on(m.cfg.train.stack, m.device):
        return None
    widths = tuple(getattr(m.sae, "prefix_widths", ()))  # Matryoshka's prefixes: one set per stack
    return (kind, m.data.d_in, m.hidden, m.use_bf16, m.next_batch, m.sae.subtract_b_dec, widths)


def stack_groups(members: Sequence[Trainer]) -> list[list[int]]:
    """Indices of members that step together (groups of two or more), by stack_key."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(members):
        key = stack_key(m)
        if key is not None:
            groups.setdefault(key, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _member_tensors(m: Trainer) -> dict[str, Tensor]:
    # W_enc is held transposed ([H, D] rows), the layout it has per member (it starts as W_dec^T)
    return {
        "W_enc": m.sae.W_enc.detach().t(),
        "b_enc": m.sae.b_enc.detach(),
        "W_dec": m.sae.W_dec.detach(),
        "b_dec": m.sae.b_dec.detach(),
    }


def _scheduled_lr(m: Trainer, step: int) -> float:
    o = m.cfg.optimizer
    return m.lr * lr_multiplier(step, m.total_steps, o.lr_warmup_frac, o.lr_decay_frac)


def _as_member(name: str, t: Tensor) -> Tensor:
    return t.t() if name == "W_enc" else t


class Stack:
    """Members (Trainers, set up, all at the same next batch) stepped as one batched SAE."""

    def __init__(self, members: Sequence[Trainer]) -> None:
        self.members = list(members)
        first = self.members[0]
        kind = type(first.sae)
        self.topk = kind is not ReluSAE  # the TopK family: unit decoder rows, AuxK, dead counts
        self.batch_topk = kind in BATCH_TOPK  # the batch's top B * k, and an inference threshold
        self.prefix_widths: list[int] = list(getattr(first.sae, "prefix_widths", [first.hidden]))
        self.device = first.device
        self.use_bf16 = first.use_bf16
        self.params: dict[str, nn.Parameter] = {}
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        per_member = [_member_tensors(m) for m in self.members]
        for name in PARAMS:
            self.params[name] = nn.Parameter(torch.stack([t[name] for t in per_member]))
            moments = [self._moments(m, name) for m in self.members]
            self.exp_avg[name] = torch.stack([a for a, _ in moments])
            self.exp_avg_sq[name] = torch.stack([b for _, b in moments])
        self.adam_steps = [self._adam_step(m) for m in self.members]
        if self.topk:
            counts = [m.sae.get_buffer("tokens_since_fired") for m in self.members]
            self.tokens_since_fired = torch.stack(counts)
        if self.batch_topk:
            self.threshold = torch.stack([m.sae.get_buffer("threshold") for m in self.members])
            flags = [m.sae.get_buffer("threshold_initialised") for m in self.members]
            self.threshold_initialised = torch.stack(flags)
        self._constants()
        self._bind()

    def _constants(self) -> None:
        """The per-member numbers that do not change step to step, on the device once (on CUDA each
        small host-to-device copy costs a launch, and a small stacked step is only a few launches)."""
        members, dev = self.members, self.device
        o = [m.cfg.optimizer for m in members]

        def on_device(values: Sequence[float], dims: int = 1) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev).view(-1, *[1] * (dims - 1))

        self.scales = on_device([m.scale_factor for m in members], 3)
        self.clips = on_device([oi.grad_clip for oi in o])
        self.b1, self.b2 = [oi.beta1 for oi in o], [oi.beta2 for oi in o]
        self.adam_consts = {  # per parameter's rank: 1 - beta1, beta2, 1 - beta2, eps
            dims: [on_device(v, dims) for v in ([1 - b for b in self.b1], self.b2, [1 - b for b in self.b2])]
            + [on_device([oi.eps for oi in o], dims)]
            for dims in {p.dim() for p in self.params.values()}
        }
        if self.topk:
            saes: list[Any] = [m.sae for m in members]
            self.ks = [s.k for s in saes]
            self.aux_ks = [s.aux_k for s in saes]
            self.dead_after = torch.tensor([s.aux_dead_tokens for s in saes], device=dev)[:, None]
            self.aux_coef = on_device([s.aux_k_coef for s in saes])
            self.aux_k = on_device(self.aux_ks)
            self.k_per_member = torch.tensor(self.ks, device=dev)[:, None]
            self.momentum = on_device([getattr(s, "threshold_momentum", 0.0) for s in saes])
            # [N, 1, max k] masks of each member's first k (of its sorted top max-k): main, AuxK
            self.keep = [
                torch.arange(max(ks), device=dev) < torch.tensor(ks, device=dev)[:, None, None]
                for ks in (self.ks, self.aux_ks)
            ]

    # --- members' views into the stack ---------------------------------------------------------
    @staticmethod
    def _state(m: Trainer, name: str) -> dict[str, Any]:
        return m.optimizer.state.get(getattr(m.sae, name), {})

    def _moments(self, m: Trainer, name: str) -> tuple[Tensor, Tensor]:
        state = self._state(m, name)
        like = _member_tensors(m)[name]
        if "exp_avg" not in state:
            return torch.zeros_like(like), torch.zeros_like(like)
        return _as_member(name, state["exp_avg"]), _as_member(name, state["exp_avg_sq"])

    def _adam_step(self, m: Trainer) -> int:
        state = self._state(m, "W_enc")
        return int(state["step"]) if "step" in state else 0

    def _bind(self) -> None:
        """Point every member's parameters, TopK buffer and Adam state at its slice of the stack."""
        for i, m in enumerate(self.members):
            views = {name: nn.Parameter(_as_member(name, self.params[name].data[i])) for name in PARAMS}
            states = {
                name: {
                    "step": torch.tensor(float(self.adam_steps[i])),  # on the host while stacked
                    "exp_avg": _as_member(name, self.exp_avg[name][i]),
                    "exp_avg_sq": _as_member(name, self.exp_avg_sq[name][i]),
                }
                for name in PARAMS
            }
            self._rebind(m, views, states)
            if self.topk:
                m.sae.register_buffer("tokens_since_fired", self.tokens_since_fired[i])
            if self.batch_topk:
                m.sae.register_buffer("threshold", self.threshold[i])
                m.sae.register_buffer("threshold_initialised", self.threshold_initialised[i])

    def _step_tensor(self, i: int) -> Tensor:
        # as torch's fused Adam keeps it: fp32, on the parameters' device
        return torch.tensor(float(self.adam_steps[i]), dtype=torch.float32, device=self.device)

    @staticmethod
    def _rebind(m: Trainer, params: dict[str, nn.Parameter], states: dict[str, dict[str, Any]]) -> None:
        """Replace m's parameters (and its optimizer's references and state) by `params`."""
        old = {name: getattr(m.sae, name) for name in PARAMS}
        for name, p in params.items():
            setattr(m.sae, name, p)
        replace = {id(old[name]): params[name] for name in PARAMS}
        for group in m.optimizer.param_groups:
            group["params"] = [replace.get(id(p), p) for p in group["params"]]
        for name in PARAMS:
            m.optimizer.state.pop(old[name], None)
            if states[name]["step"] > 0:  # an Adam that has not stepped has no state yet
                m.optimizer.state[params[name]] = states[name]

    def release(self, i: int) -> Trainer:
        """Member i leaves the stack with its own copies of its weights, buffer and Adam state."""
        m = self.members[i]
        params = {name: nn.Parameter(_as_member(name, self.params[name].data[i]).clone()) for name in PARAMS}
        states = {
            name: {
                "step": self._step_tensor(i),
                "exp_avg": _as_member(name, self.exp_avg[name][i]).clone(),
                "exp_avg_sq": _as_member(name, self.exp_avg_sq[name][i]).clone(),
            }
            for name in PARAMS
        }
        self._rebind(m, params, states)
        if self.topk:
            m.sae.register_buffer("tokens_since_fired", self.tokens_since_fired[i].clone())
        if self.batch_topk:
            m.sae.register_buffer("threshold", self.threshold[i].clone())
            m.sae.register_buffer("threshold_initialised", self.threshold_initialised[i].clone())
        return m

    # --- one step --------------------------------------------------------------------------------
    def _losses(self, x_BD: Tensor, coefs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per member: (loss, mse, l0) [N], fired [N, H] and the summed loss to differentiate."""
        p = self.params
        x_NBD = x_BD[None] * self.scales
        x_in = x_NBD - p["b_dec"][:, None, :] if self.members[0].sae.subtract_b_dec else x_NBD
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()
        with autocast:
            pre = torch.baddbmm(p["b_enc"][:, None, :], x_in, p["W_enc"].transpose(1, 2))
            if self.batch_topk:
                f = self._batch_topk(pre)
            elif self.topk:
                f = self._topk(pre, self.keep[0])
            else:
                f = torch.relu(pre)
            *inner, x_hat = self._reconstructions(f)
            aux = self._aux(x_NBD, x_hat, pre) if self.topk else None  # AuxK's matmul too
        mse = mse_per_token(x_NBD, x_hat)
        for x_hat_g in inner:  # Matryoshka's inner prefixes (MatryoshkaBatchTopKSAE): their errors join aux
            assert aux is not None
            aux = aux + mse_per_token(x_NBD, x_hat_g)
        active = f > 0
        l0 = active.sum(-1).float().mean(-1)
        if aux is None:
            sparsity = (f.float() * p["W_dec"].norm(dim=-1).float()[:, None, :]).sum(-1).mean(-1)
            loss = mse + coefs * sparsity
        else:
            loss = mse + aux
        return loss, mse, l0, active.any(1), loss.sum()

    def _reconstructions(self, f: Tensor) -> list[Tensor]:
        """x_hat of every nested prefix, narrowest first (one, the full width, but for Matryoshka)."""
        W_dec, b_dec = self.params["W_dec"], self.params["b_dec"][:, None, :]
        out: list[Tensor] = []
        start = 0
        for end in self.prefix_widths:
            f_g, W_g = f[..., start:end], W_dec[:, start:end]
            out.append(out[-1] + torch.bmm(f_g, W_g) if out else torch.baddbmm(b_dec, f_g, W_g))
            start = end
        return out

    def _batch_topk(self, pre: Tensor) -> Tensor:
        """Each member's batch_size * k largest relu(pre) over its whole batch (dense), as BatchTopKSAE,
        members differing in k; updates each one's running inference threshold as it does."""
        N, B, H = pre.shape
        n_keep = (self.k_per_member * B).clamp(max=B * H)  # [N, 1]
        flat = pre.reshape(N, B * H)
        vals, idx = flat.topk(int(n_keep.max()), dim=-1)  # sorted: a member's n largest are the first n
        keep = torch.arange(vals.shape[-1], device=pre.device) < n_keep
        kept = torch.relu(vals) * keep
        with torch.no_grad():  # BatchTopKSAE._update_threshold, per member
            positive = kept.detach().float()
            inf = torch.full_like(positive, torch.inf)
            smallest = torch.where(positive > 0, positive, inf).min(-1).values
            smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold)
            m = self.momentum
            blended = m * self.threshold + (1 - m) * smallest
            self.threshold.copy_(torch.where(self.threshold_initialised, blended, smallest))
            self.threshold_initialised.fill_(True)
        return torch.zeros_like(flat).scatter_(-1, idx, kept).view(N, B, H)

    @staticmethod
    def _topk(pre: Tensor, keep: Tensor) -> Tensor:
        """Each member's k largest relu(pre) per token (dense), members differing in k: `keep` [N, 1,
        max k] marks each member's first k."""
        vals, idx = pre.topk(keep.shape[-1], dim=-1)  # sorted: a member's k largest are the first k
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals) * keep)

    def _aux(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """Per member: AuxK on its dead latents, as TopKSAE.aux_loss (0 where aux_k_coef is 0)."""
        dead = self.tokens_since_fired >= self.dead_after
        masked = torch.where(dead[:, None, :], pre, torch.full_like(pre, -torch.inf))
        f_aux = self._topk(masked, self.keep[1]).nan_to_num(0.0)
        residual = (x - x_hat).detach()
        aux_mse = mse_per_token(residual, torch.bmm(f_aux, self.params["W_dec"]))
        scale = self.aux_coef * (dead.sum(-1).float() / self.aux_k).clamp(max=1.0)
        return torch.where(self.aux_coef > 0, scale * aux_mse, torch.zeros_like(aux_mse))

    def step(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One optimizer step of every member on the (raw) batch; per-member (loss, mse, l0, fired)."""
        members = self.members
        steps = [m.state.step for m in members]
        self.adam_steps = [n + 1 for n in self.adam_steps]
        # this step's per-member numbers in one host-to-device copy: l1 coefficient, Adam's step size
        # lr / (1 - beta1^t) and bias correction sqrt(1 - beta2^t)
        per_step = torch.tensor(
            [
                [
                    sparsity_coefficient(s, m.total_steps, m.l1_lambda, m.cfg.optimizer.l1_warmup_frac)
                    for s, m in zip(steps, members, strict=True)
                ],
                [
                    _scheduled_lr(m, s) / (1 - b**n)
                    for m, s, b, n in zip(members, steps, self.b1, self.adam_steps, strict=True)
                ],
                [(1 - b**n) ** 0.5 for b, n in zip(self.b2, self.adam_steps, strict=True)],
            ],
            dtype=torch.float32,
        ).to(self.device, non_blocking=True)
        coefs = per_step[0]
        for p in self.params.values():
            p.grad = None
        loss, mse, l0, fired, total = self._losses(x_BD, coefs)
        total.backward()
        grads = {name: p.grad for name, p in self.params.items()}
        assert all(g is not None for g in grads.values())
        g: dict[str, Tensor] = {name: t for name, t in grads.items() if t is not None}
        W_dec = self.params["W_dec"].detach()
        if self.topk:  # the radial part of each unit decoder row's gradient (TopKSAE)
            remove_radial_part(g["W_dec"], W_dec)
        self._clip(g)
        self._adam(g, per_step[1], per_step[2])
        if self.topk:
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                self.tokens_since_fired += x_BD.shape[0]
                self.tokens_since_fired.masked_fill_(fired, 0)
        return loss.detach(), mse.detach(), l0.detach(), fired

    def _clip(self, g: dict[str, Tensor]) -> None:
        """clip_grad_norm_ per member over its own gradients (grad_clip <= 0: none)."""
        clips = self.clips
        sq = sum(t.float().pow(2).flatten(1).sum(1) for t in g.values())
        assert isinstance(sq, Tensor)
        coef = (clips / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        coef = torch.where(clips > 0, coef, torch.ones_like(coef))
        for t in g.values():
            t.mul_(coef.view(-1, *[1] * (t.dim() - 1)).to(t.dtype))

    def _adam(self, g: dict[str, Tensor], step_size: Tensor, bias2: Tensor) -> None:
        """Adam (torch.optim.Adam's update) on the stacked parameters, each member with its own lr (at
        its schedule's step, in step_size = lr / (1 - beta1^t)), betas, eps and bias correction."""
        with torch.no_grad():
            for name, p in self.params.items():
                shape = (-1,) + (1,) * (p.dim() - 1)
                one_minus_b1, b2, one_minus_b2, eps = self.adam_consts[p.dim()]
                m_, v_ = self.exp_avg[name], self.exp_avg_sq[name]
                m_.lerp_(g[name], one_minus_b1)
                v_.mul_(b2).addcmul_(g[name], g[name] * one_minus_b2)
                denom = (v_.sqrt() / bias2.view(shape)).add_(eps)  # as torch's Adam: a division
                p.sub_(step_size.view(shape) * m_ / denom)
        for i, m in enumerate(self.members):  # the members' optimizer state counts the step too
            for name in PARAMS:
                param = getattr(m.sae, name)
                state = m.optimizer.state.get(param)
                if state:  # a CPU count while stacked: no copy to the device per member and step
                    state["step"].fill_(float(self.adam_steps[i]))
                    continue
                m.optimizer.state[param] = {
                    "step": torch.tensor(float(self.adam_steps[i])),
                    "exp_avg": _as_member(name, self.exp_avg[name][i]),
                    "exp_avg_sq": _as_member(name, self.exp_avg_sq[name][i]),
                }
