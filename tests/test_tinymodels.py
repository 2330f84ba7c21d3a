"""The shipped tiny models: files, tokenizer, chat template, config; real-engine checks marked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    model_dir,
    render_prompt,
)
from harness.tinymodels.build import check_models, safetensors_header

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 2+2?"}]
EXPECTED_PROMPT = "<|user|>What is 2+2?<|assistant|>"


# --------------------------------------------------------------------------- files and config
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_files_exist(name):
    d = model_dir(name)
    for f in MODEL_FILES:
        assert (d / f).is_file(), f"{d / f} missing; run python -m harness build-models"


def test_check_models_clean():
    assert check_models() == {name: [] for name in MODEL_NAMES}


def test_shipped_size_small():
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 3 * 1024 * 1024


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config(name):
    config = json.loads((model_dir(name) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert head_dim >= 32  # vLLM's CPU attention kernel
    assert config["tie_word_embeddings"] is True
    want = UNSUPPORTED_ARCHITECTURE if name == TINY_UNSUPPORTED else "LlamaForCausalLM"
    assert config["architectures"] == [want]
    header = safetensors_header(model_dir(name) / "model.safetensors")
    assert header["model.embed_tokens.weight"]["shape"] == [config["vocab_size"], config["hidden_size"]]
    assert header["model.embed_tokens.weight"]["dtype"] == "BF16"
    assert "lm_head.weight" not in header


def test_shipped_json_files_match_builder():
    """config/tokenizer files are exactly what the builder writes (deterministic, no training)."""
    pytest.importorskip("tokenizers")
    from harness.tinymodels import build

    d = model_dir(TINY_CHAT)
    assert json.loads((d / "config.json").read_text()) == build.config_dict()
    assert json.loads((d / "tokenizer_config.json").read_text()) == build.tokenizer_config_dict()
    assert json.loads((d / "special_tokens_map.json").read_text()) == build.special_tokens_map()
    assert (d / "tokenizer.json").read_text() == build.build_tokenizer_json()
    for name in (TINY_RANDOM, TINY_UNSUPPORTED):
        assert (model_dir(name) / "tokenizer.json").read_text() == (d / "tokenizer.json").read_text()


def test_check_reports_problems(tmp_path):
    broken = tmp_path / TINY_CHAT
    broken.mkdir()
    for f in MODEL_FILES:
        (broken / f).write_bytes((model_dir(TINY_CHAT) / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    problems = check_models(tmp_path, (TINY_CHAT,))[TINY_CHAT]
    assert problems and "safetensors" in problems[0]
    (broken / "config.json").unlink()
    assert any("missing" in p for p in check_models(tmp_path, (TINY_CHAT,))[TINY_CHAT])


# --------------------------------------------------------------------------- tokenizer, template
def test_tokenizer_digits_single_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(model_dir(TINY_CHAT) / "tokenizer.json"))
    for d in "0123456789":
        enc = tok.encode(d, add_special_tokens=False)
        assert enc.tokens == [d]
        assert tok.decode(enc.ids) == d
    text = "What is 12+7? 19\n"
    enc = tok.encode(text, add_special_tokens=False)
    assert len(enc.ids) == len(text)
    assert tok.decode(enc.ids) == text
    enc = tok.encode(EXPECTED_PROMPT + "4</s>", add_special_tokens=False)
    assert enc.tokens[0] == "<|user|>" and enc.tokens[-3:] == ["<|assistant|>", "4", "</s>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "What is 2+2?4"


def test_chat_template_renders_trained_prompt():
    import jinja2

    env = jinja2.Environment()
    tmpl = env.from_string(CHAT_TEMPLATE)
    assert tmpl.render(messages=QUESTION, add_generation_prompt=True) == EXPECTED_PROMPT
    assert render_prompt("What is 2+2?") == EXPECTED_PROMPT
    convo = QUESTION + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert tmpl.render(messages=convo, add_generation_prompt=True) == (
        "<|user|>What is 2+2?<|assistant|>4</s><|user|>And 3+3?<|assistant|>"
    )


def test_transformers_tokenizer_chat_template():
    """What vLLM does: AutoTokenizer + apply_chat_template(add_generation_prompt=True)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir(TINY_CHAT)))
    assert tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == EXPECTED_PROMPT
    assert tok.eos_token == "</s>"
    ids = tok(EXPECTED_PROMPT, add_special_tokens=True)["input_ids"]
    assert ids == tok(EXPECTED_PROMPT, add_special_tokens=False)["input_ids"]  # no BOS added
    assert len(ids) == 14


def test_facts():
    facts = addition_facts()
    assert len(facts) == 100 and ("What is 2+2?", "4") in facts


def test_light_import_without_torch():
    code = (
        "import sys; import harness.tinymodels, harness.tinymodels.build, "
        "harness.tinymodels.verify, harness.commands.build_models; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_cli_check():
    out = subprocess.run(
        [sys.executable, "-m", "harness", "build-models", "--check", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["check"] == {name: [] for name in MODEL_NAMES}


# --------------------------------------------------------------------------- rebuilds
def test_rebuild_random_deterministic(tmp_path):
    """tiny-random (and so tiny-unsupported's weights) rebuilds bit-identically (~5 s)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from harness.tinymodels.build import build_all

    build_all(tmp_path, (TINY_RANDOM, TINY_UNSUPPORTED), log=lambda _m: None)
    for name in (TINY_RANDOM, TINY_UNSUPPORTED):
        for f in MODEL_FILES:
            assert (tmp_path / name / f).read_bytes() == (model_dir(name) / f).read_bytes(), (name, f)


@pytest.mark.engine
def test_rebuild_chat_deterministic(tmp_path):
    """Retraining tiny-chat (~20-50 s on 2 busy cores) gives the shipped weights, or at least
    the same greedy answers where float results differ (another CPU / torch build)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from harness.tinymodels import build

    result = build.build_all(tmp_path, (TINY_CHAT,), log=lambda _m: None)[TINY_CHAT]
    assert result["exact"] >= 98
    for f in MODEL_FILES:
        if f != "model.safetensors":
            assert (tmp_path / TINY_CHAT / f).read_bytes() == (model_dir(TINY_CHAT) / f).read_bytes()
    new = (tmp_path / TINY_CHAT / "model.safetensors").read_bytes()
    if new != (model_dir(TINY_CHAT) / "model.safetensors").read_bytes():
        import torch

        answers = []
        for d in (tmp_path / TINY_CHAT, model_dir(TINY_CHAT)):
            m = build._new_model(d).to(torch.bfloat16).eval()
            build.load_weights(m, d / "model.safetensors")
            answers.append(build.greedy(m, [render_prompt(q) for q, _ in addition_facts()], 4))
        assert answers[0] == answers[1]


# --------------------------------------------------------------------------- real engine
@pytest.mark.engine
def test_tiny_chat_through_vllm_cpu(tmp_path):
    """vLLM CPU server on tiny-chat answers >= 95 of the 100 facts exactly (~60-90 s)."""
    pytest.importorskip("vllm")
    from harness.probes.validation import is_correct
    from harness.tinymodels import verify

    with verify.serve(
        model_dir(TINY_CHAT), tmp_path / "engine.log", args={"enforce_eager": True}, timeout_s=240
    ) as srv:
        assert srv.ready_s is not None, srv.log()[-3000:]
        answer = verify.chat(srv, "What is 2+2?")
        assert is_correct(answer), answer
        good, wrong = verify.check_facts(srv)
    assert good >= 95, wrong
