"""LongBench's middle truncation and the answer text decode as transformers 4.x does, on every version.

THUDM's ``LongBench/pred.py`` (and the LaCache repository's copy, ``LongBench/pred.py`` @ 0f27c33, run
under its pinned transformers 4.43.4) cuts a long prompt with ``tokenizer.decode(half,
skip_special_tokens=True)``. Under 4.x the fast tokenizer's ``_decode`` (``tokenization_utils_fast.py``)
decodes with the ``tokenizers`` backend, then applies ``clean_up_tokenization`` when the tokenizer's
``clean_up_tokenization_spaces`` is set; transformers 5 skips that step for BPE tokenizers. The rule
is re-derived below from 4.43.4's ``tokenization_utils_base.py`` and compared with the harness.
"""
import pytest
import transformers
from packaging.version import Version

from harness.generation import decode_text, truncate_middle


def reference_cleanup(text: str) -> str:
    """transformers 4.43.4 ``PreTrainedTokenizerBase.clean_up_tokenization``, written out."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


def reference_decode(tok, ids, clean: bool) -> str:
    """4.x ``PreTrainedTokenizerFast._decode(ids, skip_special_tokens=True)``: backend decode, then the clean-up."""
    text = tok.backend_tokenizer.decode(list(ids), skip_special_tokens=True)
    return reference_cleanup(text) if clean else text


def reference_truncate(tok, prompt: str, max_length: int, clean: bool) -> str:
    """LongBench ``pred.py``'s truncation: first and last ``int(max_length / 2)`` tokens, decoded apart."""
    ids = tok(prompt, truncation=False).input_ids
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = reference_decode(tok, ids[:half], clean) + reference_decode(tok, ids[-half:], clean)
    return prompt


def bpe_tokenizer(**declared):
    """A byte-level BPE tokenizer (the model type of Llama-3's and GPT-2's) that adds ``<s>``; ``declared``
    is what its configuration says (e.g. ``clean_up_tokenization_spaces=True``, as Llama-3's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    merges = [("i", "t"), ("Ġ", "'"), ("Ġ'", "s"), ("Ġ", ","), ("Ġ", "t")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(["<s>", "</s>"])  # as a tokenizer.json's added tokens: skipped on decode by every version
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **declared)


HEAD = "Passage 1: it 's late , the dog is n't home . Who 's there ? "
TAIL = " Answer : it 's the cat , I 'm sure ."
TEXT = HEAD + "filler text " * 40 + TAIL


def test_the_tokenizer_is_bpe_and_round_trips():
    tok = bpe_tokenizer(clean_up_tokenization_spaces=True)
    assert type(tok.backend_tokenizer.model).__name__ == "BPE"
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id and tok.backend_tokenizer.decode(ids, skip_special_tokens=True) == TEXT


@pytest.mark.parametrize("max_length", [130, 131, 200])
def test_truncation_applies_the_declared_cleanup_in_both_halves(max_length):
    tok = bpe_tokenizer(clean_up_tokenization_spaces=True)
    assert len(tok(TEXT).input_ids) > max_length
    expected = reference_truncate(tok, TEXT, max_length, clean=True)
    out = truncate_middle(tok, TEXT, max_length)
    assert out == expected
    # both halves are cleaned, not only the cut
    assert out.startswith("Passage 1: it's late, the dog isn't home. Who's there?")
    assert out.endswith("Answer : it's the cat, I'm sure.")


def test_a_tokenizer_that_does_not_declare_the_cleanup_keeps_its_spaces():
    tok = bpe_tokenizer(clean_up_tokenization_spaces=False)
    out = truncate_middle(tok, TEXT, 130)
    assert out == reference_truncate(tok, TEXT, 130, clean=False)
    assert out.startswith(HEAD) and out.endswith(TAIL)
    # nothing declared at all: the same text (not the 4.4x default, which differs between versions)
    assert truncate_middle(bpe_tokenizer(), TEXT, 130) == out


def test_a_short_prompt_is_returned_untouched():
    tok = bpe_tokenizer(clean_up_tokenization_spaces=True)
    assert truncate_middle(tok, TEXT, 10_000) == TEXT  # no decode, no clean-up


def test_answers_are_decoded_with_the_declared_cleanup():
    tok = bpe_tokenizer(clean_up_tokenization_spaces=True)
    ids = tok(TAIL).input_ids + [tok.eos_token_id]
    assert decode_text(tok, ids) == reference_decode(tok, ids, clean=True) == " Answer : it's the cat, I'm sure."
    plain = bpe_tokenizer(clean_up_tokenization_spaces=False)
    assert decode_text(plain, plain(TAIL).input_ids) == TAIL


def test_the_declaration_survives_save_and_load(tmp_path):
    bpe_tokenizer(clean_up_tokenization_spaces=True).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert truncate_middle(tok, TEXT, 130) == reference_truncate(tok, TEXT, 130, clean=True)


@pytest.mark.skipif(Version(transformers.__version__).major >= 5,
                    reason="transformers 5 skips the clean-up for BPE tokenizers: the re-derived rule is the 4.x one")
def test_the_rederived_rule_is_what_transformers_4_decodes():
    tok = bpe_tokenizer(clean_up_tokenization_spaces=True)
    ids = tok(TEXT).input_ids
    for part in (ids[:65], ids[-65:], ids):
        assert tok.decode(part, skip_special_tokens=True) == reference_decode(tok, part, clean=True)
