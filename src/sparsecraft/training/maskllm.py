"""MaskLLM: learned N:M masks over frozen weights, trained end to end on the language-model loss.

Fang et al., *MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models*, NeurIPS 2024,
https://arxiv.org/abs/2409.17481. Every group of m consecutive input weights of a target Linear picks one of the
K = C(m, n) candidate masks that keep exactly n of them (6 for 2:4). Each group owns K logits ``pi``; a training
step samples a soft choice with Gumbel-softmax

    y = softmax((kappa * pi + g) / tau),  g ~ Gumbel(0, 1)           # (out, G, K)
    mask = y @ C                                                     # (out, G, m), C = candidates (K, m)

and multiplies the frozen weight by it. ``tau`` falls linearly from 4 to 0.05 and the scaling factor ``kappa``
rises linearly from 100 to 500 over the run (the paper's values), so the sampled masks harden as training ends.
The logits start from a one-shot mask (SparseGPT, Wanda, ...): candidate k gets ``prior_strength / kappa_0 *
(overlap_k - (n - 1))``, where overlap_k counts the kept positions it shares with the prior, so the prior's own
candidate is the unique argmax at step 0. Optional sparse weight regularisation (paper eq. 8) subtracts
``weight_reg * (1 - t/T) * sum ||W * mask||^2`` from the loss, favouring masks that keep large weights.
In eval mode the mask is the argmax candidate of every group: exact N:M by construction.

Candidate order (documented, tested): the kept index sets of ``itertools.combinations(range(m), n)``, i.e.
lexicographic; for 2:4: 1100, 1010, 1001, 0110, 0101, 0011.

Resumable: :meth:`MaskLLM.train` writes ONE safetensors file (logits, AdamW state, both RNG states, step and
records in its metadata) atomically every ``checkpoint_every`` steps; a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from sparsecraft.checkpoint import PACKED_FILE, save_masks, save_packed
from sparsecraft.engine.blocks import find_blocks, find_targets, weight_2d
from sparsecraft.io import StagedOutput, atomic_save_tensors
from sparsecraft.patterns import NM, check_shape, satisfies

STATE_FILE = "maskllm_state.safetensors"


# --- pure math ---------------------------------------------------------------------------------------------
def candidates(pattern: NM) -> torch.Tensor:
    """The C(m, n) masks keeping exactly n of m, as a bool tensor (K, m), in lexicographic order of kept indices."""
    rows = []
    for kept in itertools.combinations(range(pattern.m), pattern.n):
        row = torch.zeros(pattern.m, dtype=torch.bool)
        row[list(kept)] = True
        rows.append(row)
    return torch.stack(rows)


def prior_logits(keep: torch.Tensor, pattern: NM, strength: float) -> torch.Tensor:
    """Prior keep-mask (out, in), exactly n kept per group -> logits (out, in/m, K) with its candidate on top.

    Logit of candidate k = strength * (overlap_k - (n - 1)): the prior's own candidate gets +strength, every other
    candidate at most 0 (it shares at most n - 1 kept positions). Pure.
    """
    rows, cols = keep.shape
    check_shape((rows, cols), pattern, "prior mask")
    groups = keep.reshape(rows, cols // pattern.m, pattern.m)  # (out, G, m)
    if not bool((groups.sum(-1) == pattern.n).all()):
        raise ValueError(f"the prior mask must keep exactly {pattern.n} of every {pattern.m} weights along the input "
                         f"dim; prune the prior with pattern '{pattern}' (e.g. sparsecraft.prune(..., pattern="
                         f"'{pattern}'))")
    overlap = groups.float() @ candidates(pattern).float().T  # (out, G, K): kept positions shared with each one
    return strength * (overlap - (pattern.n - 1))


class _GumbelSoftMask(torch.autograd.Function):
    """soft_mask's math with one saved tensor (the softmax output) and in-place temporaries: about 1.6x faster
    than the autograd composition on the 159M logits of SmolLM2-135M, and the same values."""

    @staticmethod
    def forward(ctx, logits, cands, scale, tau, generator):  # type: ignore[override]
        z = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(min=1e-20)
        z.log_().neg_().log_().neg_()  # Gumbel(0, 1)
        z.add_(logits, alpha=scale).div_(tau)
        y = torch.softmax(z, dim=-1)  # (out, G, K)
        del z
        ctx.save_for_backward(y, cands)
        ctx.coef = scale / tau
        return (y @ cands).flatten(1)  # (out, G, m) -> (out, in)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y, cands = ctx.saved_tensors
        dy = grad.reshape(*y.shape[:-1], cands.shape[1]) @ cands.T  # d mask / d y: (out, G, K)
        dot = (dy * y).sum(-1, keepdim=True)
        dy.sub_(dot).mul_(y).mul_(ctx.coef)  # softmax backward, times d z / d logits = scale / tau
        return dy, None, None, None, None


def soft_mask(logits: torch.Tensor, cands: torch.Tensor, scale: float, tau: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-softmax sample: logits (out, G, K), candidates (K, m) -> differentiable mask (out, G * m).

    y = softmax((scale * logits + g) / tau) with g = -log(-log(u)), u ~ U(0, 1); mask = y @ candidates."""
    return _GumbelSoftMask.apply(logits, cands.to(logits.dtype), scale, tau, generator)


def hard_mask(logits: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """logits (out, G, K) -> keep (out, G * m): the argmax candidate of every group (ties: the lower index)."""
    return cands[logits.argmax(dim=-1)].flatten(1)  # (out, G, m) -> (out, in)


def linear_ramp(start: float, end: float, step: int, steps: int) -> float:
    """start at step 0, end at step ``steps`` - 1 (the paper ramps tau and kappa linearly over the run)."""
    return start + (end - start) * min(step / max(steps - 1, 1), 1.0)


# --- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskLLMConfig:
    pattern: NM = NM(2, 4)
    steps: int = 1000  # the schedules (tau, kappa, lr, weight_reg) run over this many steps
    lr: float = 5e-4  # AdamW on the logits (paper: 5e-5 x lr multiplier 10), cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    temperature: tuple[float, float] = (4.0, 0.05)  # tau, start -> end, linear
    scale: tuple[float, float] = (100.0, 500.0)  # kappa, start -> end, linear
    prior_strength: float = 3.0  # logit margin of the prior's candidate at step 0, in kappa-scaled units
    init_std: float = 0.0  # optional N(0, init_std) noise on the logits; 0 keeps argmax == prior exactly
    weight_reg: float = 0.0  # paper: 1e-5; decays linearly to 0 over the run
    grad_clip: float = 1.0  # max norm of the logits' gradient; 0 disables
    seed: int = 0  # Gumbel noise and init noise

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, NM):
            raise ValueError(f"pattern must be an NM such as NM(2, 4) (parse '2:4' with parse_pattern), got "
                             f"{self.pattern!r}")
        if self.steps < 1 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need steps >= 1, lr > 0 and 0 <= min_lr_ratio <= 1")
        if min(self.temperature) <= 0 or min(self.scale) <= 0 or len(self.temperature) != 2 or len(self.scale) != 2:
            raise ValueError("temperature and scale are (start, end) pairs of positive numbers, e.g. (4.0, 0.05)")
        if self.prior_strength < 0 or self.init_std < 0 or self.weight_reg < 0 or self.grad_clip < 0:
            raise ValueError("prior_strength, init_std, weight_reg and grad_clip must be >= 0")

    def to_json(self) -> dict:
        body = asdict(self)
        body["pattern"] = str(self.pattern)
        body["temperature"], body["scale"] = list(self.temperature), list(self.scale)
        return body


# --- the parametrization -----------------------------------------------------------------------------------
class MaskedWeight(nn.Module):
    """weight -> weight * mask; Gumbel-sampled soft mask in training mode, argmax (hard) mask in eval mode."""

    def __init__(self, logits: torch.Tensor, cands: torch.Tensor, transposed: bool) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)  # (out, G, K) float32
        self.register_buffer("cands", cands, persistent=False)  # (K, m) bool
        self.transposed = transposed  # GPT-2 Conv1D stores (in, out)
        self.tau, self.scale = 1.0, 1.0  # set by MaskLLM.set_step
        self.generator: torch.Generator | None = None
        self.track_norm = False
        self.kept_norm: torch.Tensor | None = None  # ||W * mask||^2 of the last forward, for weight_reg

    def mask(self) -> torch.Tensor:
        if self.training:
            return soft_mask(self.logits, self.cands, self.scale, self.tau, self.generator)
        return hard_mask(self.logits.detach(), self.cands)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask().to(weight.dtype)
        if self.transposed:
            mask = mask.T
        if self.training and self.track_norm:
            self.kept_norm = (weight.detach() * mask).pow(2).sum()
        return weight * mask


def default_targets(model: nn.Module) -> list[str]:
    """Fqns of every prunable Linear (and GPT-2 Conv1D) inside the model's repeated blocks."""
    fqn, blocks = find_blocks(model)
    return [f for i, b in enumerate(blocks) for f in find_targets(b, f"{fqn}.{i}")]


# --- the trainer -------------------------------------------------------------------------------------------
class MaskLLM:
    """Learn N:M masks for ``fqns`` of ``model`` (default: every prunable layer in its blocks) with weights frozen.

    ``prior`` maps fqn -> one-shot keep-mask (module layout, exactly n of m kept); a fqn without prior starts
    from uniform logits. Every model parameter is frozen while this object is attached; :meth:`finalize`
    (or :meth:`remove`) takes the parametrizations off again.
    """

    def __init__(self, model: nn.Module, config: MaskLLMConfig, prior: Mapping[str, torch.Tensor] | None = None,
                 fqns: Sequence[str] | None = None) -> None:
        self.model, self.config = model, config
        self.fqns = list(fqns) if fqns is not None else default_targets(model)
        prior = dict(prior or {})
        unknown = sorted(set(prior) - set(self.fqns))
        if unknown:
            raise ValueError(f"prior masks given for modules that are not targets: {unknown[:5]}; pass fqns=[...]")
        self.generator = torch.Generator().manual_seed(config.seed)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.params: dict[str, MaskedWeight] = {}
        cands = candidates(config.pattern)
        for fqn in self.fqns:
            self.params[fqn] = self._attach(fqn, prior.get(fqn), cands)
        self.step = 0
        self.records: list[dict[str, float]] = []
        self.optimizer = torch.optim.AdamW([p.logits for p in self.params.values()], lr=config.lr, weight_decay=0.0)
        self.set_step(0)

    def _attach(self, fqn: str, prior: torch.Tensor | None, cands: torch.Tensor) -> MaskedWeight:
        module = self.model.get_submodule(fqn)
        w = weight_2d(module)  # (out, in); a transposed view for GPT-2 Conv1D, which stores (in, out)
        transposed = w is not module.weight
        check_shape(tuple(w.shape), self.config.pattern, fqn)
        out_f, in_f = w.shape
        logits = torch.zeros(out_f, in_f // self.config.pattern.m, cands.shape[0])  # (out, G, K)
        if self.config.init_std > 0:
            logits += self.config.init_std * torch.randn(logits.shape, generator=self.generator)
        if prior is not None:
            keep = prior.T if transposed else prior
            if tuple(keep.shape) != (out_f, in_f) or keep.dtype != torch.bool:
                raise ValueError(f"prior mask of {fqn!r} must be torch.bool of the weight's shape "
                                 f"{tuple(module.weight.shape)} (module layout, True = keep)")
            kappa0 = self.config.scale[0]  # logits are multiplied by kappa: the margin is prior_strength at step 0
            logits += prior_logits(keep.cpu(), self.config.pattern, self.config.prior_strength / kappa0)
        p = MaskedWeight(logits.to(w.device), cands.to(w.device), transposed)
        p.generator = self.generator if w.device.type == "cpu" else None
        p.track_norm = self.config.weight_reg > 0
        parametrize.register_parametrization(module, "weight", p, unsafe=True)
        return p

    # --- schedules -------------------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Temperature, scaling factor and learning rate of ``step``."""
        c = self.config
        for p in self.params.values():
            p.tau = linear_ramp(*c.temperature, step, c.steps)
            p.scale = linear_ramp(*c.scale, step, c.steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step / max(c.steps - 1, 1), 1.0)))
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine)

    def weight_reg_at(self, step: int) -> float:
        return self.config.weight_reg * (1.0 - min(step / self.config.steps, 1.0))

    # --- training --------------------------------------------------------------------------------------------
    def loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """LM loss of a token batch (B, T) under sampled masks, minus the weight regulariser."""
        out = self.model(input_ids=ids, labels=ids, use_cache=False)
        rec = {"ce": out.loss.item()}
        loss = out.loss
        reg = self.weight_reg_at(self.step)
        if reg > 0:
            kept = torch.stack([p.kept_norm for p in self.params.values() if p.kept_norm is not None]).sum()
            loss = loss - reg * kept
            rec["kept_norm"] = kept.item()
        return loss, rec

    def train(self, batches: Sequence[torch.Tensor], checkpoint: str | Path | None = None,
              checkpoint_every: int = 0, log: Callable[[dict[str, float]], None] | None = None
              ) -> list[dict[str, float]]:
        """Train from the current step to ``config.steps``; step s uses ``batches[s % len(batches)]`` (B, T).

        With ``checkpoint`` (a folder) the state is saved there every ``checkpoint_every`` steps and at the end,
        and an existing state there is loaded first (same config and targets required): an interrupted call
        repeated with the same arguments finishes with exactly the logits of an uninterrupted run.
        """
        if not batches:
            raise ValueError("no training batches: pass a list of token-id tensors of shape (batch, seqlen)")
        folder = Path(checkpoint) if checkpoint is not None else None
        if folder is not None and (folder / STATE_FILE).is_file():
            self.load_state(folder / STATE_FILE)
        self.model.train()
        logits = [p.logits for p in self.params.values()]
        # As tau falls, softmax weights of e^-80..e^-100 are subnormal floats, and a CPU matmul over a weight with 0.2%
        # subnormal entries ran 12x slower (measured on SmolLM2 at tau 0.22): flush them to zero while training.
        torch.set_flush_denormal(True)
        try:
            while self.step < self.config.steps:
                self.set_step(self.step)
                loss, rec = self.loss(batches[self.step % len(batches)])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(logits, self.config.grad_clip)
                self.optimizer.step()
                rec.update(step=float(self.step), loss=loss.item(), tau=next(iter(self.params.values())).tau)
                self.records.append(rec)
                self.step += 1
                if folder is not None and checkpoint_every > 0 and self.step % checkpoint_every == 0:
                    self.save_state(folder / STATE_FILE)
                if log is not None:
                    log(rec)
            if folder is not None:
                self.save_state(folder / STATE_FILE)
        finally:
            torch.set_flush_denormal(False)  # torch's default
            self.model.eval()
        return self.records

    # --- resumable state -------------------------------------------------------------------------------------
    def save_state(self, path: str | Path) -> None:
        """Logits, AdamW moments, RNG states and step in one safetensors file, written atomically."""
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state(), "rng.gumbel": self.generator.get_state()}
        state = self.optimizer.state_dict()["state"]
        for i, (fqn, p) in enumerate(self.params.items()):
            tensors[f"logits.{fqn}"] = p.logits.detach()
            for name, value in state.get(i, {}).items():
                tensors[f"adam.{name}.{fqn}"] = value
        meta = {"step": self.step, "config": self.config.to_json(), "fqns": self.fqns, "records": self.records}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(tensors, path, metadata={"maskllm": json.dumps(meta)})

    def load_state(self, path: str | Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["maskllm"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read the MaskLLM state {path} ({e}); delete it to start again") from None
        if meta["config"] != self.config.to_json() or meta["fqns"] != self.fqns:
            raise ValueError(f"the MaskLLM state in {path} was trained with other settings or targets; resume with "
                             f"the same config, or delete the file to start again")
        opt_state = self.optimizer.state_dict()
        for i, (fqn, p) in enumerate(self.params.items()):
            with torch.no_grad():
                p.logits.copy_(tensors[f"logits.{fqn}"])
            moments = {}
            for key, value in tensors.items():
                if key.startswith("adam."):
                    _, name, owner = key.split(".", 2)  # adam.<exp_avg|exp_avg_sq|step>.<fqn>
                    if owner == fqn:
                        moments[name] = value
            if moments:
                opt_state["state"][i] = moments
        self.optimizer.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.gumbel"])
        self.step, self.records = int(meta["step"]), list(meta["records"])

    # --- results ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The argmax keep-mask of every target (module layout, CPU, torch.bool), exact N:M."""
        out = {}
        for fqn, p in self.params.items():
            keep = hard_mask(p.logits, p.cands).cpu()  # (out, in)
            assert satisfies(keep, self.config.pattern), "argmax of candidates is N:M by construction"
            out[fqn] = keep.T.contiguous() if p.transposed else keep
        return out

    def remove(self) -> None:
        """Take the parametrizations off (weights dense and untouched again) and restore requires_grad."""
        for fqn in self.fqns:
            module = self.model.get_submodule(fqn)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """Fix the argmax masks, remove the parametrizations, zero every pruned weight; -> masks by fqn."""
        masks = self.masks()
        self.remove()
        for fqn, keep in masks.items():
            weight = self.model.get_submodule(fqn).weight
            weight.masked_fill_(~keep.to(weight.device), 0.0)
        return masks


def merge_weights(dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept entries from a one-shot solver's updated weights, pruned entries from the dense ones (pure).

    Frozen weights for MaskLLM that reproduce the one-shot model exactly under the prior mask, while a group
    whose learned mask differs still sees its original dense values.
    """
    return torch.where(keep, pruned, dense)


def save_masked_model(model: nn.Module, tokenizer: object, masks: Mapping[str, torch.Tensor], pattern: NM,
                      output: str | Path) -> None:
    """The usual pruned-model folder: HF checkpoint (+ tokenizer), ``masks.safetensors`` and ``sparse/``, staged.

    ``model`` must already carry the masked weights (see :meth:`MaskLLM.finalize`); validate ``output`` with
    ``sparsecraft.io.check_output`` first.
    """
    masks = dict(masks)
    with StagedOutput(output) as stage:
        model.save_pretrained(stage.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage.path)
        save_masks(masks, stage.path / "masks.safetensors")
        (stage.path / "sparse").mkdir()
        save_packed(model, masks, pattern, stage.path / "sparse" / PACKED_FILE)
