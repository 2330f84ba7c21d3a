"""Exact-length prompts from a tokenizer, and output counting by re-tokenising."""

import pytest

from harness.probes.load import run_profile
from harness.probes.profiles import ProbeProfile
from harness.probes.prompts import PromptFactory
from harness.probes.stub import StubConfig, StubServer

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE tokenizer that prepends <s>, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog %d times" % i for i in range(200)]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return str(path)


@pytest.mark.parametrize("n", [2, 3, 8, 32, 100])
def test_prompts_have_the_exact_token_count_with_specials(tokenizer_dir, n):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_dir + "/tokenizer.json")
    factory = PromptFactory(tokenizer_dir)
    for seed in range(5):
        text, count = factory.make(n, seed)
        assert count == n
        assert len(tok.encode(text).ids) == n
        assert factory.make(n, seed) == (text, count)  # seeded


def test_word_prompts_without_tokenizer(tmp_path):
    factory = PromptFactory(str(tmp_path))  # no tokenizer.json there
    text, count = factory.make(10, 1)
    assert count is None and len(text.split()) == 10
    assert "no usable tokenizer.json" in factory.note


def test_no_usage_counts_output_by_retokenising(tokenizer_dir):
    # Each streamed chunk holds two tokens' worth of text: counting chunks would be wrong.
    with StubServer(StubConfig(usage="none", token_text=" the quick")) as stub:
        res = run_profile(
            stub.url,
            "stub",
            None,
            ProbeProfile(concurrency=[2], requests=4, warmup_requests=0, input_tokens=12, output_tokens=3),
            tokenizer_dir=tokenizer_dir,
            measure_ceiling=False,
        )
    (lv,) = res["levels"]
    expected = len(PromptFactory(tokenizer_dir).tokenizer.encode(" the quick" * 3, add_special_tokens=False).ids)
    assert lv["token_count_source"] == {"tokenizer": 4}
    assert lv["total_output_tokens"] == 4 * expected != 4 * 3
    assert lv["total_input_tokens"] == 4 * 12  # known exactly from the tokenizer
    assert res["prompt_tokens_exact"] is True
