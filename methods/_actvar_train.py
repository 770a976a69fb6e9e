"""ActVAR's training recipe (paper §3.3-3.4, supplementary §6); its settings are declared once, in
methods/actvar.py's SETTINGS, and what it returns is saved by methods/_actvar_artifacts.py.

Training (`prepare`), through `VAR.forward_by_scale` (teacher-forced inputs, scale by scale with KV caches,
which is where the sparse scales act), on real images of the model's dataset:
  stage 1  router + selector only, everything else frozen:
           L = CE + Σ_blocks mean_sparse_scales [0.05·(KL_w + KL_t) + 0.01·(bal_w + bal_t)]
           router label: per token, MSE of each expert's output (+b2) to the full FFN output, top-K_w smallest
           -> softmax; selector label: per token, mean squared change through the full dense block (attention
           over the present cache + all tokens), top-K_t largest -> softmax. KL(p ‖ label) as in eq. 6/11.
           Balance: GShard, M·Σ_i f_i·P_i (f_i: share of the top-K picks, P_i: mean probability; 1 = uniform),
           over experts for the router and over token positions (across the batch rows) for the selector.
           top-k has no gradient: the kept tokens' block update and each kept expert's output are multiplied by
           p/p.detach() (value exactly 1; forward unchanged) so that CE reaches router and selector.
  stage 2  router + selector frozen; attention, FFN (the experts), head fine-tuned with
           L = CE + KL(student ‖ teacher logits) + mean_blocks MSE(student hidden, teacher hidden)
  AdamW β=(0.9, 0.95), wd 0.05, lr 2e-4 (stage 2; stage 1 default 1e-3: see actvar.SETTINGS), warm-up + cosine.
  Reading of the paper where it is loose: the labels' "σ(A)" is one softmax over the top-k entries of the
  per-row z-scored distances (raw MSEs are scale-dependent: ~1e-4 would make every label uniform), smoothed with
  ε=0.01 so that KL(p ‖ label) stays finite; CFG's unconditional rows are trained by dropping 10% of labels.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from bench.log import progress as progress_iter
from bench.train import lr_at
from methods import _moe, _tokens
from methods._actvar_artifacts import TRAINED, trained_names
from methods._actvar_net import ActExpertFFN, attach, new_gates
from methods._moe_recipe import log, logger
from methods._tokens import LearnedGate, TokenGatedBlock

STAGE1_KL, STAGE1_BAL = 0.05, 0.01          # eq. 19's α, β
LABEL_EPS = 0.01                            # label smoothing that keeps KL(p ‖ label) finite
UNCOND_FRACTION = 0.1                       # share of training rows given the unconditional label (CFG)


# ------------------------------------------------------------------------------------------------ losses
def pseudo_label(score: torch.Tensor, k: int, eps: float = LABEL_EPS) -> torch.Tensor:
    """σ(top-k(score)): softmax over the k largest (z-scored per row) entries, zero elsewhere, ε-smoothed."""
    M = score.shape[-1]
    z = (score - score.mean(-1, keepdim=True)) / (score.std(-1, unbiased=False, keepdim=True) + 1e-8)
    top = z.topk(min(k, M), dim=-1)
    lab = torch.zeros_like(z).scatter_(-1, top.indices, top.values.softmax(-1))
    return lab * (1 - eps) + eps / M


def kl_to_label(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ label) = Σ p (log p − log label), mean over rows (eq. 6, 11)."""
    logp = logits.log_softmax(-1)
    return (logp.exp() * (logp - label.log())).sum(-1).mean()


def balance_loss(probs: torch.Tensor, picked: torch.Tensor, k: int) -> torch.Tensor:
    """GShard load balance M·Σ_i f_i·P_i over the last dim (f: share of the picks, no grad; P: mean probability)."""
    M = probs.shape[-1]
    f = picked.float().reshape(-1, M).sum(0) / (picked.reshape(-1, M).shape[0] * k)
    return M * (f * probs.reshape(-1, M).mean(0)).sum()


def overlap(a_idx: torch.Tensor, b_scores: torch.Tensor, k: int) -> float:
    """Share of the picked set a that is also in the top-k of b (diagnostic: selection vs label)."""
    b_idx = b_scores.topk(min(k, b_scores.shape[-1]), dim=-1).indices
    hit = torch.zeros_like(b_scores, dtype=torch.bool).scatter_(-1, b_idx, True).gather(-1, a_idx)
    return float(hit.float().mean())


def token_aux(wrapper: TokenGatedBlock, x, u, mods, cache, si, idx, probs) -> None:
    """Selector distillation terms of one block at one scale (appended to wrapper.aux)."""
    with torch.no_grad():
        y = _tokens.full_block_update(wrapper.block, x, u, mods, cache, si)
        change = (y - x).float().pow(2).mean(-1)                          # (rows, n)
    k = idx.shape[1]
    logits = wrapper.gate.logits(u)
    picked = torch.zeros_like(change, dtype=torch.bool).scatter_(1, idx, True)
    wrapper.aux.append(dict(block=wrapper.index, si=si, part="t", kl=kl_to_label(logits, pseudo_label(change, k)),
                            bal=balance_loss(logits.softmax(-1), picked, k), overlap=overlap(idx, change, k)))


def expert_aux(layer: ActExpertFFN, h, logits, top, si) -> dict:
    """Router distillation terms of one ActExpertFFN at one scale: label from each expert's output distance to
    the full FFN output (MSE(e_j(x)+b2, F(x)), the k smallest), KL, balance and the label overlap."""
    k = top.shape[1]
    with torch.no_grad():
        C, N, e = layer.dim, layer.num_experts, layer.expert_size
        outs = torch.einsum("tne,cne->tnc", h.detach(), layer.fc2.weight.detach().view(C, N, e))
        dist = (outs - outs.sum(1, keepdim=True)).float().pow(2).mean(-1)   # MSE(e_j(x)+b2, F(x)), (T, N)
    picked = torch.zeros_like(dist, dtype=torch.bool).scatter_(1, top, True)
    return dict(block=layer.index, si=si, part="w", kl=kl_to_label(logits, pseudo_label(-dist, k)),
                bal=balance_loss(logits.softmax(-1), picked, k), overlap=overlap(top, -dist, k))


# ------------------------------------------------------------------------------------------------ training
class HiddenCapture:
    """Outputs of every block over the scale-by-scale pass, concatenated per block: (rows, L, C) each."""

    def __init__(self, net):
        self.net, self.parts, self.handles = net, [[] for _ in net.blocks], []

    def __enter__(self):
        for i, blk in enumerate(self.net.blocks):
            self.handles.append(blk.register_forward_hook(lambda m, a, o, i=i: self.parts[i].append(o)))
        return self

    def hidden(self) -> List[torch.Tensor]:
        return [torch.cat(p, dim=1) for p in self.parts]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def scale_by_scale(net, label_B, x_BLCv, frozen_before: int = 0):
    """VAR.forward_by_scale, with scales before `frozen_before` run without autograd (stage 1: nothing trainable
    acts there, and their KV caches do not depend on the gates)."""
    caches, out = net.new_caches(), []
    grad = torch.is_grad_enabled()
    for si in range(len(net.patch_nums)):
        bg, ed = net.begin_ends[si]
        x_in = None if si == 0 else x_BLCv[:, bg - net.first_l:ed - net.first_l]
        with torch.set_grad_enabled(grad and si >= frozen_before):
            out.append(net.scale_forward(si, x_in, label_B, caches))
    return torch.cat(out, dim=1)


def _set(net, aux=None, straight_through=False):
    for mod in net.modules():
        if isinstance(mod, (TokenGatedBlock, ActExpertFFN)):
            mod.aux = aux
            mod.straight_through = straight_through
            if isinstance(mod, TokenGatedBlock):
                mod.aux_fn = token_aux if isinstance(mod.gate, LearnedGate) else None
            else:
                mod.aux_fn = expert_aux


def stage1_regulariser(aux: List[dict]):
    """Σ_blocks mean over its sparse scales of [0.05·(KL_w + KL_t) + 0.01·(bal_w + bal_t)] (eq. 19)."""
    per_block: Dict[int, Dict[int, list]] = {}
    for a in aux:
        per_block.setdefault(a["block"], {}).setdefault(a["si"], []).append(STAGE1_KL * a["kl"] + STAGE1_BAL * a["bal"])
    terms = [torch.stack([sum(v) for v in scales.values()]).mean() for scales in per_block.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _summ(aux: List[dict]) -> dict:
    out = {}
    for part in ("w", "t"):
        xs = [a for a in aux if a["part"] == part]
        if xs:
            out[f"kl_{part}"] = float(torch.stack([a["kl"].detach() for a in xs]).mean())
            out[f"bal_{part}"] = float(torch.stack([a["bal"].detach() for a in xs]).mean())
            out[f"label_overlap_{part}"] = sum(a["overlap"] for a in xs) / len(xs)
    return out


def kl_student_teacher(s_logits, t_logits):
    """KL(student ‖ teacher) per token (eq. 21's direction), mean over tokens."""
    ls, lt = s_logits.float().log_softmax(-1), t_logits.float().log_softmax(-1)
    return (ls.exp() * (ls - lt)).sum(-1).mean()


@torch.no_grad()
def evaluate(net, teacher, vqvae, toks, labels, batch: int = 32) -> dict:
    """Validation losses of both stages on held-out images (conditional labels), averaged over rows."""
    aux: List[dict] = []
    _set(net, aux=aux)
    net.eval()
    sums: Dict[str, float] = {}
    n = labels.shape[0]
    try:
        for i in range(0, n, batch):
            pick = torch.arange(i, min(n, i + batch), device=labels.device)
            lab, x_in, gt = _moe.teacher_forcing_input(vqvae, toks, labels, pick)
            t_logits, t_hidden = teacher(lab, x_in, return_hidden=True)
            aux.clear()
            with HiddenCapture(net) as cap:
                s_logits = net.forward_by_scale(lab, x_in)
            V = s_logits.shape[-1]
            vals = dict(ce=F.cross_entropy(s_logits.reshape(-1, V), gt.reshape(-1)).item(),
                        teacher_ce=F.cross_entropy(t_logits.reshape(-1, V), gt.reshape(-1)).item(),
                        kl_teacher=kl_student_teacher(s_logits, t_logits).item(),
                        hidden_mse=float(sum(F.mse_loss(s, t) for s, t in zip(cap.hidden(), t_hidden)) / len(t_hidden)),
                        **_summ(aux))
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v * len(pick)
    finally:
        _set(net, aux=None)
    return {k: round(v / n, 6) for k, v in sums.items()}


def _lr_loop(name, net, params, steps, lr, batch, seed, toks, labels, vqvae, uncond, loss_fn, progress):
    history = []
    t0 = time.time()
    if steps == 0:
        return history, 0.0
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in (progress_iter(range(steps), desc=f"actvar {name}", unit="step", logger=logger)
                 if progress else range(steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
        pick = torch.randint(0, labels.shape[0], (batch,), generator=gen).to(labels.device)
        lab, x_in, gt = _moe.teacher_forcing_input(vqvae, toks, labels, pick)
        lab = _moe.drop_labels(lab, uncond, net.num_classes, gen)
        loss, logs = loss_fn(lab, x_in, gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            history.append(dict(step=step + 1, loss=round(loss.item(), 5), **{k: round(v, 5) for k, v in logs.items()}))
            if progress:
                log(f"actvar {name} step {step + 1}/{steps} loss {loss.item():.4f} " +
                         " ".join(f"{k} {v:.4f}" for k, v in logs.items()) +
                         f" ({(time.time() - t0) / (step + 1):.2f}s/step)")
    return history, time.time() - t0


def stage1(net, routers, selectors, steps, lr, batch, seed, toks, labels, vqvae, uncond, progress=False):
    """Train router + selector (everything else frozen): CE + eq. 19's distillation and balance terms."""
    net.requires_grad_(False)
    params = [p for ms in (routers or []) + (selectors or []) for p in ms.parameters()]
    for p in params:
        p.requires_grad_(True)
    aux: List[dict] = []
    _set(net, aux=aux, straight_through=True)
    net.train()
    first = min([s for m in net.modules() if isinstance(m, (ActExpertFFN, LearnedGate)) for s in m.kept], default=0)

    def loss_fn(lab, x_in, gt):
        aux.clear()
        logits = scale_by_scale(net, lab, x_in, frozen_before=first)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        return ce + stage1_regulariser(aux), dict(ce=ce.item(), **_summ(aux))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _lr_loop("stage 1", net, params, steps, lr, batch, seed, toks, labels, vqvae, uncond, loss_fn,
                            progress)
    finally:
        _set(net, aux=None)
        net.requires_grad_(False).eval()


def stage2(net, base, teacher, steps, lr, batch, seed, toks, labels, vqvae, uncond, progress=False):
    """Router + selector frozen; fine-tune attention, FFN (experts) and head: CE + KL(s‖t) + mean_blocks MSE."""
    net.requires_grad_(False)
    names = set(trained_names(base))
    params = [p for n, p in base.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    _set(net, aux=None, straight_through=False)
    net.train()

    def loss_fn(lab, x_in, gt):
        with torch.no_grad():
            t_logits, t_hidden = teacher(lab, x_in, return_hidden=True)
        with HiddenCapture(net) as cap:
            logits = net.forward_by_scale(lab, x_in)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        kl = kl_student_teacher(logits, t_logits)
        mse = sum(F.mse_loss(s, t) for s, t in zip(cap.hidden(), t_hidden)) / len(t_hidden)
        return ce + kl + mse, dict(ce=ce.item(), kl_teacher=kl.item(), hidden_mse=mse.item())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            return _lr_loop("stage 2", net, params, steps, lr, batch, seed + 1, toks, labels, vqvae, uncond, loss_fn,
                            progress)
    finally:
        net.requires_grad_(False).eval()


def train_actvar(bundle, method, recipe: dict, progress: bool = False) -> dict:
    """Both stages on the model's data (method: an ActVAR method, for its config and parts; recipe: the recorded
    settings). Returns dict(routers, selectors, weights (name -> fp16 tensor, or None), meta (losses before/after
    each stage, timings))."""
    t0 = time.time()
    c = method.config
    teacher = bundle.var.eval()
    base = copy.deepcopy(bundle.var).float().eval()
    C, H, depth = base.C, base.blocks[0].ffn.fc1.out_features, len(base.blocks)
    routers, selectors = new_gates(C, H, depth, method.parts, c.get("experts", 1), c["prepare_seed"], bundle.device)
    kt, kw = method.kept_tokens(bundle, train=True), method.kept_experts(bundle, train=True)
    net = attach(base, method.parts, routers, selectors, kw, kt)
    toks, labels = _moe.token_data(bundle, recipe["images"], "train", recipe["data"])
    vtoks, vlabels = _moe.token_data(bundle, recipe["eval_images"], "val", recipe["data"])
    args = dict(batch=recipe["batch"], seed=c["prepare_seed"], toks=toks, labels=labels, vqvae=bundle.vqvae,
                uncond=recipe["uncond_fraction"], progress=progress)
    before = evaluate(net, teacher, bundle.vqvae, vtoks, vlabels)
    hist1, sec1 = stage1(net, routers, selectors, c["steps1"], recipe["lr1"], **args)
    after1 = evaluate(net, teacher, bundle.vqvae, vtoks, vlabels)
    hist2, sec2 = stage2(net, base, teacher, c["steps2"], recipe["lr2"], **args)
    weights = None
    if c["steps2"] > 0:
        with torch.no_grad():     # what is stored (float16) is what will run from now on
            for n, p in base.named_parameters():
                if TRAINED.match(n):
                    p.copy_(p.half().float())
        weights = {n: p.detach().half().cpu() for n, p in base.named_parameters() if TRAINED.match(n)}
    after2 = evaluate(net, teacher, bundle.vqvae, vtoks, vlabels) if c["steps2"] > 0 else after1
    meta = dict(parts=method.parts, kept_tokens={str(k): v for k, v in kt.items()},
                kept_experts={str(k): v for k, v in kw.items()}, experts=c.get("experts"),
                val_before=before, val_after_stage1=after1, val_after_stage2=after2,
                history_stage1=hist1, history_stage2=hist2, seconds_stage1=round(sec1, 2),
                seconds_stage2=round(sec2, 2), seconds=round(time.time() - t0, 2), train_rows=int(labels.shape[0]),
                eval_rows=int(vlabels.shape[0]), data=recipe["data"])
    return dict(routers=routers, selectors=selectors, weights=weights, meta=meta, net=net)


