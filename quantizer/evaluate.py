"""Offline draft acceptance of an MTP layer, replayed on captured sequences.

For store row p of a sequence (the target's state h_p and the token t_{p+1} it produced next)
the MTP block is run to its head — exactly as vLLM runs the drafter — and its top-1 draft
of t_{p+2} is compared with the token the target actually produced two positions on (the
next_token of row p+1). That is what vLLM's greedy k = 1 verification accepts, so counted
over the *generated* positions (rows p ≥ L − 1 for a prompt of L tokens) it estimates vLLM's
acceptance rate. Also per position: the draft's cross-entropy on t_{p+2} and, against the BF16
master's MTP run on the same inputs, KL(master ‖ draft) and top-1 agreement.

vLLM does not draft at every position: with k = 1 each step drafts from the position after
the last verified token, so an accepted draft skips the next position. Hits are correlated
(a repeating pattern is drafted right at some phases only), so ``acceptance_vllm_schedule`` —
the same hits replayed on that schedule per sequence — is the figure comparable with vLLM's
counters; ``acceptance`` counts every generated position.

Prompt lengths come from the prompts the sequences were captured from (``prompts``: matched by
prompt id, checked against the stored tokens); without them a sequence's generated part is
inferred as the longest tail on which the target's own greedy choice — its head applied to the
stored states — is the stored next token (greedy captures; a near-tie within 1% of the row's
logit range counts as greedy, so bf16 rounding of the stored states does not cut the tail).

Both replay modes: ``full`` (the real block over whole sequences: what vLLM runs) and
``identity`` (the attention sub-layer skipped: what identity-replay Hessians assume).
The head is the target's (vLLM replaces the MTP's own ``shared_head.head`` by the target's
``lm_head``). Works for DeepSeek-V3 and DeepSeek-V4 checkpoints; quantised experts in
compressed-tensors ``pack-quantized`` form are decoded to the weights vLLM computes with.

    from requant.quantizer.evaluate import OfflineConfig, evaluate_offline
    res = evaluate_offline(OfflineConfig(checkpoint="runs/q", against="DeepSeek-V4-Flash", stores=["runs/held"]))
    res["modes"]["full"]["acceptance"]
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from requant.quantizer.core.limits import MAX_BYTES, MAX_ROWS
from requant.quantizer.core.pack import unpack_int32
from requant.quantizer.core.quant import QuantSpec, dequantize
from requant.quantizer.mtp.arch import TARGET_EMBEDDINGS, MTPSpec, checkpoint_config, load_block, load_spec, read_tensor
from requant.quantizer.mtp.common import rms_norm
from requant.quantizer.mtp.dsv4 import DSV4Dims, hc_head
from requant.quantizer.mtp.weights import load_mtp_weights, tensor_files

MODES = ("identity", "full")
LOGIT_BYTES = 256 << 20   # fp32 logits held at once (rows × vocab)


@dataclass(frozen=True)
class OfflineConfig:
    checkpoint: str
    stores: tuple[str, ...]
    against: str | None = None        # BF16 master (None: the checkpoint's manifest master, if any)
    prompts: str | None = None        # the prompt source the stores were captured from (prompt lengths)
    modes: tuple[str, ...] = MODES
    device: str | None = None         # None: cuda if available, else cpu
    max_bytes: int = MAX_BYTES        # host memory for store rows being read
    max_rows: int = MAX_ROWS          # rows per block call (whole sequences; a longer one goes alone)

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"replay modes must be among {MODES}, got {list(self.modes)}")
        if not self.stores:
            raise ValueError("offline evaluation needs capture stores (held-out captured sequences)")


# -- checkpoints ------------------------------------------------------------------------------------

def check_mtp_checkpoint(path: str | Path) -> tuple[dict, MTPSpec]:
    """(config, spec) of a checkpoint that has an MTP layer; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    config = checkpoint_config(path)
    spec = load_spec(config)
    where = tensor_files(path)
    if not any(n.startswith(spec.prefix) for n in where):
        raise ValueError(f"{path}: no {spec.prefix}* tensors — this checkpoint has no MTP layer to evaluate "
                         "(a base without its MTP layer? evaluate the quantised checkpoint or the master)")
    for e in range(spec.n_experts):
        for p in ("w1", "w2", "w3"):
            n = spec.expert_name(e, p)
            if n + ".weight" not in where and n + ".weight_packed" not in where:
                raise ValueError(f"{path}: MTP layer incomplete, no {n}.weight (or .weight_packed)")
    return config, spec


def load_mtp_for_eval(path: str | Path, spec: MTPSpec, device) -> dict[str, torch.Tensor]:
    """The MTP tensors (relative names), with compressed-tensors packed experts decoded to bf16
    (``weight_packed`` int4 × ``weight_scale`` per group, the weights vLLM's kernels use)."""
    w = load_mtp_weights(path, prefix=spec.prefix, device=device)

    def scale_of(base: str) -> torch.Tensor:
        found = read_tensor(path, [spec.prefix + base + ".weight_scale"])
        if found is None:
            raise ValueError(f"{path}: {spec.prefix}{base}.weight_packed has no {base}.weight_scale")
        return found[1].to(device)
    return decode_packed(w, scale_of)


def decode_packed(w: dict[str, torch.Tensor], scale_of) -> dict[str, torch.Tensor]:
    """``w`` with every ``X.weight_packed`` (and ``X.weight_shape``) replaced by ``X.weight`` in bf16:
    int4 × the group scales ``scale_of(X)`` (the weights vLLM's kernels use); ``w`` is changed."""
    for k in [k for k in w if k.endswith(".weight_packed")]:
        base = k.removesuffix(".weight_packed")
        scale = scale_of(base)
        shape = w.pop(base + ".weight_shape", None)
        q = unpack_int32(w.pop(k))
        if shape is not None:
            q = q[:, :int(shape[1])]
        group = q.shape[1] // scale.shape[1]
        w[base + ".weight"] = dequantize(q, scale, QuantSpec(group_size=group)).to(torch.bfloat16)
    return w


class TargetHead:
    """The target model's head, shared with the MTP by vLLM: logits of the MTP's head input,
    and the target's own greedy choice from a store row (DSV3: the final post-norm state;
    DSV4: the pre-``hc_head`` residual streams, collapsed and normed as the target does)."""

    def __init__(self, path: Path, spec: MTPSpec, config: dict, device):
        names = ["lm_head.weight", "head.weight"]
        found = read_tensor(path, names) or read_tensor(path, [spec.prefix + "shared_head.head.weight"])
        if found is None:
            raise ValueError(f"{path}: no head ({', '.join(names)}): the drafts' logits need the target's head")
        self.name, self.weight = found[0], found[1].to(device, torch.bfloat16)
        self.spec, self.device = spec, torch.device(device)
        self.hc = None
        if spec.arch == "dsv4":
            parts = {}
            for key, cands in (("fn", ["hc_head_fn", "model.hc_head_fn"]), ("base", ["hc_head_base", "model.hc_head_base"]),
                               ("scale", ["hc_head_scale", "model.hc_head_scale"]),
                               ("norm", ["norm.weight", "model.norm.weight"])):
                t = read_tensor(path, cands)
                if t is None:
                    raise ValueError(f"{path}: no target {cands[0]} (the target's greedy choice needs its hc_head)")
                parts[key] = t[1].to(device)
            self.hc, self.dims = parts, DSV4Dims.from_config(config)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.device).float() @ self.weight.float().T

    def greedy_consistent(self, hidden: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
        """[T] bool: whether the stored next token is the target's greedy choice at each store row
        (hidden [T, width]) — within 1% of the row's logit range of the top logit, so that the
        bf16 rounding of the stored state cannot turn a near-tie into a mismatch."""
        out, step = [], _logit_rows(self.weight.shape[0])
        for s in range(0, hidden.shape[0], step):
            h = hidden[s:s + step].to(self.device)
            if self.hc is not None:
                d = self.dims
                z = hc_head(h.view(h.shape[0], d.hc_mult, d.hidden), self.hc["fn"], self.hc["scale"],
                            self.hc["base"], d)
                h = rms_norm(z, self.hc["norm"], d.eps)
            lg = self.logits(h)
            top, low = lg.max(-1).values, lg.min(-1).values
            chosen = lg.gather(1, next_token[s:s + step, None].to(lg.device)).squeeze(1)
            out.append((chosen >= top - 0.01 * (top - low)).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _logit_rows(vocab: int) -> int:
    return max(1, LOGIT_BYTES // (4 * vocab))


def _manifest_master(ckpt: Path) -> str | None:
    m = ckpt / "requant-manifest.json"
    if not m.exists():
        return None
    return json.loads(m.read_text()).get("job", {}).get("master")


def calibrated_on(ckpt: Path, stores: list[str]) -> bool:
    """Whether a requant checkpoint's manifest lists one of ``stores`` as calibration data: the
    same directory (grown since, perhaps) or a store with the same id (a copy)."""
    from requant.quantizer.stage.provenance import store_facts

    m = ckpt / "requant-manifest.json"
    if not m.exists():
        return False
    calib = json.loads(m.read_text()).get("stores", [])
    paths = {str(Path(s["path"]).resolve()) for s in calib}
    ids = {s["id"] for s in calib}
    return any(str(Path(s).resolve()) in paths or store_facts(s)["id"] in ids for s in stores)


# -- prompt lengths ---------------------------------------------------------------------------------

def prompt_lengths(source: str, model: str | Path) -> dict[str, list[int]]:
    """prompt id → the chat-templated prompt's token ids (as vLLM renders a chat request), for
    every record of a prompt source (file or hub dataset)."""
    from transformers import AutoTokenizer

    from requant.orchestrator.prompts import PromptConfig, load_prompts

    tok = AutoTokenizer.from_pretrained(str(model))
    out = {}
    for p in load_prompts(PromptConfig(source=source, shuffle=False)):
        out[p.prompt_id] = list(tok.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
    return out


def _our_prompt_id(stored: str) -> str:
    from requant.orchestrator.ledger import prompt_of

    return prompt_of(stored) or stored


def generated_start(next_token: torch.Tensor, prompt: list[int] | None, greedy: torch.Tensor | None) -> tuple[int, str]:
    """Row index of the last prompt position (L − 1) of a sequence, and how it was found:
    ``prompt`` when its token ids match the stored next tokens, else ``inferred`` from
    ``greedy`` (per row: the stored next token is the target's greedy choice): the start of the
    longest all-greedy tail."""
    n = next_token.shape[0]
    if prompt is not None and 1 <= len(prompt) <= n + 1 and \
            torch.equal(next_token[:len(prompt) - 1], torch.tensor(prompt[1:], dtype=next_token.dtype)):
        return len(prompt) - 1, "prompt"
    if greedy is None:
        raise ValueError("cannot place the generated positions: no matching prompt and no target head")
    bad = (~greedy).nonzero()
    return (int(bad[-1]) + 1 if len(bad) else 0), "inferred"


# -- the evaluation ---------------------------------------------------------------------------------

@dataclass
class _Acc:
    positions: int = 0
    accepted: int = 0
    ce: float = 0.0
    kl: float = 0.0
    master_accepted: int = 0
    agree: int = 0
    drafts: int = 0             # vLLM's k = 1 schedule replayed (schedule())
    drafts_accepted: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, master: torch.Tensor | None) -> torch.Tensor:
        """Accumulate a chunk of positions; returns the draft hits [n] (bool, on the CPU)."""
        lp = torch.log_softmax(logits, -1)
        top = logits.argmax(-1)
        hit = top == labels
        self.positions += labels.numel()
        self.accepted += int(hit.sum())
        self.ce -= float(lp.gather(1, labels[:, None]).sum())
        if master is not None:
            lm = torch.log_softmax(master, -1)
            self.kl += float((lm.exp() * (lm - lp)).sum())
            self.master_accepted += int((master.argmax(-1) == labels).sum())
            self.agree += int((master.argmax(-1) == top).sum())
        return hit.cpu()

    def schedule(self, hits: list[bool]) -> None:
        """vLLM's greedy k = 1 drafting over one sequence's generated positions: a draft at every
        step, from the position after the last verified token — one on after a rejection, two
        after an acceptance (the bonus token). Counts the drafts vLLM would verify."""
        i = 0
        while i < len(hits):
            self.drafts += 1
            self.drafts_accepted += hits[i]
            i += 2 if hits[i] else 1

    def summary(self, has_master: bool) -> dict:
        n = max(self.positions, 1)
        out = {"positions": self.positions, "accepted": self.accepted, "acceptance": self.accepted / n,
               "ce": self.ce / n, "drafts": self.drafts,
               "acceptance_vllm_schedule": self.drafts_accepted / max(self.drafts, 1)}
        if has_master:
            out |= {"kl_to_master": self.kl / n, "master_acceptance": self.master_accepted / n,
                    "draft_agreement_with_master": self.agree / n}
        return out


def _sequence_groups(stores: list[str], max_rows: int, max_bytes: int):
    """Whole sequences grouped into calls of at most ``max_rows`` rows (a longer one alone)."""
    from requant.storage import StoreReader

    group, rows = [], 0
    with StoreReader(stores) as reader:
        for s in reader.sequences(max_bytes=max(max_bytes // 2, 1)):
            n = len(s.next_token)
            if group and rows + n > max_rows:
                yield group
                group, rows = [], 0
            group.append((s.prompt_id, s.hidden_torch().clone(),
                          torch.from_numpy(s.next_token.astype("int64")), torch.from_numpy(s.position.astype("int64"))))
            rows += n
    if group:
        yield group


def _embed_source(master: str | Path, ckpt: Path) -> Path | None:
    """Where the master's block takes the target's embedding from: the master, or — a master that
    is the MTP layer alone, as the stage accepts with a base — the evaluated checkpoint (the same
    target embedding, from the base)."""
    return None if read_tensor(Path(master), list(TARGET_EMBEDDINGS)) else ckpt


def evaluate_offline(cfg: OfflineConfig, progress=None, weights: dict[str, torch.Tensor] | None = None) -> dict:
    """Acceptance, cross-entropy and KL to the master of the checkpoint's MTP drafts on the
    stores' sequences (module docstring); ``progress(rows)`` after each group of sequences.
    ``weights``: MTP tensors (names relative to the layer's prefix, as ``load_mtp_for_eval``
    gives them) to evaluate in place of the checkpoint's own — e.g. other quantisations of its
    experts, without writing a checkpoint for each; the checkpoint still supplies config and head."""
    from requant.storage import CaptureStore

    from requant.quantizer.stage.replay import check_store_matches
    from requant.quantizer.stage.provenance import store_facts

    t0 = time.perf_counter()
    ckpt = Path(cfg.checkpoint)
    config, spec = check_mtp_checkpoint(ckpt)
    against = cfg.against or _manifest_master(ckpt)
    if against is not None:
        m_config, m_spec = check_mtp_checkpoint(against)
        if (m_spec.arch, m_spec.hidden, m_spec.n_experts, m_spec.moe_inter) != \
                (spec.arch, spec.hidden, spec.n_experts, spec.moe_inter):
            raise ValueError(f"--against {against}: its MTP layer ({m_spec.arch}, hidden {m_spec.hidden}, "
                             f"{m_spec.n_experts} experts) is not the checkpoint's ({spec.arch}, hidden {spec.hidden}, "
                             f"{spec.n_experts} experts)")
    stores = [str(s) for s in cfg.stores]
    check_store_matches(SimpleNamespace(spec=spec), stores)
    context = int(config.get("max_position_embeddings") or 0)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lengths = prompt_lengths(cfg.prompts, ckpt) if cfg.prompts else {}

    if weights is None:
        weights = load_mtp_for_eval(ckpt, spec, device)
        given = False
    else:
        given = True
    block = load_block(ckpt, device=device, weights=weights)
    same = not given and against is not None and Path(against).resolve() == ckpt.resolve()
    master = None if against is None or same else load_block(against, device=device, embed_from=_embed_source(against, ckpt))
    head = TargetHead(ckpt, spec, config, device)

    accs = {m: _Acc() for m in cfg.modes}
    how = {"prompt": 0, "inferred": 0}
    sequences = 0
    with torch.no_grad():
        for group in _sequence_groups(stores, cfg.max_rows, cfg.max_bytes):
            hidden = torch.cat([g[1] for g in group])
            tok = torch.cat([g[2] for g in group])
            pos = torch.cat([g[3] for g in group])
            lens = [len(g[2]) for g in group]
            if context and max(int(g[3][-1]) for g in group) + 2 > context:
                raise ValueError(f"a stored sequence reaches position {max(int(g[3][-1]) for g in group) + 1}, "
                                 f"beyond the model's context ({context}: max_position_embeddings)")
            greedy = None
            rows, labels, counts, start = [], [], [], 0
            for (pid, _, nt, p), n in zip(group, lens):
                sequences += 1
                if int(p[0]) != 0:
                    raise ValueError(f"sequence {pid!r} starts at position {int(p[0])}: stores hold whole sequences")
                prompt = lengths.get(_our_prompt_id(pid))
                try:
                    g0, kind = generated_start(nt, prompt, None)
                except ValueError:  # no matching prompt: infer from the target's greedy choices
                    greedy = head.greedy_consistent(hidden, tok) if greedy is None else greedy
                    g0, kind = generated_start(nt, None, greedy[start:start + n])
                how[kind] += 1
                idx = torch.arange(g0, max(g0, n - 1))   # rows whose draft's target token (row + 1) exists
                counts.append(len(idx))
                rows.append(idx + start)
                labels.append(nt[idx + 1])
                start += n
            rows, labels = torch.cat(rows), torch.cat(labels)
            if rows.numel() == 0:
                continue
            for mode in cfg.modes:
                z = block.head_input(hidden, tok, pos, mode, lens)[rows.to(device)]
                zm = None if master is None else master.head_input(hidden, tok, pos, mode, lens)[rows.to(device)]
                step, hits = _logit_rows(head.weight.shape[0]), []
                for s in range(0, rows.numel(), step):
                    lab = labels[s:s + step].to(device)
                    lm = None
                    if zm is not None:
                        lm = head.logits(zm[s:s + step])
                    elif same:
                        lm = head.logits(z[s:s + step])
                    hits.append(accs[mode].add(head.logits(z[s:s + step]), lab, lm))
                for h in torch.cat(hits).split(counts):
                    accs[mode].schedule(h.tolist())
            if progress is not None:
                progress(hidden.shape[0])
    if sequences == 0:
        raise ValueError(f"{stores}: no sequences to evaluate")
    return {
        "checkpoint": str(ckpt), "against": against, "arch": spec.arch, "stores": stores,
        "store_ids": [store_facts(s)["id"] for s in stores],
        "in_sample": calibrated_on(ckpt, stores),   # the stores (or one of them) calibrated this checkpoint
        "weights": "given" if given else "checkpoint",
        "sequences": sequences, "generated_positions_from": how, "head": head.name,
        "modes": {m: accs[m].summary(against is not None) for m in cfg.modes},
        "device": str(device), "seconds": time.perf_counter() - t0, "config": _jsonable(asdict(cfg)),
        "store_rows": sum(CaptureStore.open(s).info().rows for s in stores),
    }


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
