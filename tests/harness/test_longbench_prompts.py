"""LongBench prompts and chat modes against the reference code.

References: THUDM/LongBench ``LongBench/config/dataset2prompt.json``, ``dataset2maxlen.json`` and
``pred.py`` @ c5ea10b; the LaCache repository (GATECH-EIC/LaCache @ 0f27c33) ships the same JSON
files (sha256 of dataset2prompt.json: 56d22ad4f382169c2b8a11ff4c982a4a1bea096c8152b0f0b85b64686b157c30)
and the same ``build_chat``, but its ``pred.py`` applies it to the ``--model`` string as given (a hub path).
"""
import hashlib
import json
import types

import pytest

from longbench.config import DATASETS, DATASETS_E, MAX_NEW_TOKENS, PROMPTS
from tiny import char_tokenizer

#: sha256 of each prompt string (UTF-8) of the reference dataset2prompt.json
REFERENCE_PROMPT_SHA256 = {
    "narrativeqa": "aada7ed24b06abace5b0045ac3bcfe06fc831a6cf434f0ecfd99fb7b3d299e1c",
    "qasper": "0fbdd123fe7f83d6d6a9c583ca28cb29d68e523bf8fec01a0cf2dcd11037775d",
    "multifieldqa_en": "20b4666a2de8a1f701bdb6c4e015fa9f8758d64b361d841f7766df6c9ceba770",
    "multifieldqa_zh": "344b3a4e557cd5470c661b3d6b374339717e1257a6c01f628d22322d4a554b94",
    "hotpotqa": "9ec4ae308865bd0c62af20b3dc7b12b31f2b447f55684bd88c1aa40f2f636deb",
    "2wikimqa": "9ec4ae308865bd0c62af20b3dc7b12b31f2b447f55684bd88c1aa40f2f636deb",
    "musique": "9ec4ae308865bd0c62af20b3dc7b12b31f2b447f55684bd88c1aa40f2f636deb",
    "dureader": "ae53329f51b17908e08b8c6bf366987282b8b38c0ee35275ebd7b79e9b30eff2",
    "gov_report": "91c25d585b189ced91c9280efcb4ecb5dcff9548cd4e3bfae66c68025b569e95",
    "qmsum": "dca23b678fe0183bbd9555b57947022aed1b85739da5ad7e1b4708dd0c71c409",
    "multi_news": "2af3f28c40b902e6535d4910510d51653613c49de9b2fc287c5958395061101d",
    "vcsum": "3e5d8241bc9b512eb4929c1ba80882a44f50b446bc2b1d9d79eff030dd10dc27",
    "trec": "0eff8bebdba99d91e9d7d91b6ab39455ac74648bea92c9255c9f68c62175b2db",
    "triviaqa": "00a802e6377e72fca39b169cf6c28893bedf23ba7286b03ecd15867c3e27a7c4",
    "samsum": "a68d884234907eefcaa0eacf7b2997f60fa46603988dceae6a44f9b49f045b3f",
    "lsht": "f3edabdf7fae53d6cadfa7a10f3574d114302161c46dacecd5d30763204bbbf3",
    "passage_count": "986550b6c61009c629a4535766d94b7b51e2b2b9e1ed169e4ecb54417466e964",
    "passage_retrieval_en": "39b96b7fa52bdd2aa2bde34ea199158505201b9a0a2c3ce94e80249293f60431",
    "passage_retrieval_zh": "c1e2346e245eb365bc33a1503cde2e473948a2aad51c3e4c72893e61ab074d60",
    "lcc": "6a1f24cf0bb83cd90f1fca8f0dd24801626c2aaea29db834ddc83b950e71190e",
    "repobench-p": "ee9ec182ea5ffeb70a7140d55baea97264a8612d88226d323afa90859c36240c",
}

#: the reference dataset2maxlen.json
REFERENCE_MAX_GEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

#: datasets the reference never wraps ("chat models are better off without build prompts on these tasks")
UNWRAPPED = ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"]


def test_prompts_equal_the_reference_file_character_for_character():
    assert list(PROMPTS) == DATASETS and set(REFERENCE_PROMPT_SHA256) == set(DATASETS)
    mismatched = [name for name in DATASETS
                  if hashlib.sha256(PROMPTS[name].encode("utf-8")).hexdigest() != REFERENCE_PROMPT_SHA256[name]]
    assert mismatched == []
    assert PROMPTS["narrativeqa"].count("asconcisely") == 2  # the published text's missing space
    assert MAX_NEW_TOKENS == REFERENCE_MAX_GEN


def reference_wrap(prompt: str, model_name: str) -> str:
    """The reference ``build_chat`` rule, re-derived: case-sensitive substring tests, in its order."""
    if "longchat" in model_name or "vicuna" in model_name:  # fastchat's vicuna conversation, rendered
        return ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: " + prompt + " ASSISTANT:")
    if "llama2" in model_name:
        return "[INST]" + prompt + "[/INST]"
    if "xgen" in model_name:
        return ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.\n\n" + " ### Human: " + prompt
                + "\n###")
    if "internlm" in model_name:
        return "<|User|>:" + prompt + "<eoh>\n<|Bot|>:"
    return prompt


def reference_ids(tokenizer, sample: dict, dataset: str, max_length: int, wrap_name):
    """The reference pred.py's input ids: format, middle truncation by tokens (decoded with
    ``skip_special_tokens=True``), the wrapper unless the dataset is in its list, tokenised with BOS."""
    prompt = PROMPTS[dataset].format(**sample)
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    if dataset not in UNWRAPPED and wrap_name is not None:
        prompt = reference_wrap(prompt, wrap_name)
    return tokenizer(prompt, truncation=False).input_ids


TEMPLATE = "{% for m in messages %}<s>[U]{{ m['content'] }}[/U]{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"


def llama_char_tokenizer(chat_template=None):
    """One token per character of the prompts, samples and wrappers, BOS as Llama's tokenizer adds it."""
    wrappers = "".join(reference_wrap("", n) for n in ("vicuna", "llama2", "xgen", "internlm")) + TEMPLATE
    return char_tokenizer("".join(PROMPTS.values()) + SAMPLE_TEXT + wrappers, bos=True, chat_template=chat_template)


SAMPLE_TEXT = "Paragraph 3: the quick brown fox 0123456789 {}[]()\n文章段落问题回答。"


def sample(i: int, long: bool) -> dict:
    context = " ".join(f"Paragraph {j}: the quick brown fox 文章{j}." for j in range(60 if long else 2))
    return {"context": context, "input": f"Question {i}: which paragraph? 问题", "answers": ["Paragraph 3"],
            "all_classes": None, "length": len(context), "_id": f"s{i}"}


MODELS = [  # (LongBench model name, weights' hub path): what each mode applies the rule to
    ("llama2-7b-chat-4k", "meta-llama/Llama-2-7b-chat-hf"),
    ("longchat-v1.5-7b-32k", "lmsys/longchat-7b-v1.5-32k"),
    ("xgen-7b-8k", "Salesforce/xgen-7b-8k-inst"),
    ("internlm-7b-8k", "internlm/internlm-chat-7b-8k"),
]


def ids_reaching_generate(tmp_path, monkeypatch, tokenizer, flags, datasets, e=False):
    """Run longbench/pred.py's per-dataset loop with generation replaced by a recorder."""
    import longbench.pred as pred
    from harness.loop import run_part

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in datasets:
        with open(data / f"{name}{'_e' if e else ''}.jsonl", "w") as f:
            for i, long in enumerate([False, True]):
                f.write(json.dumps(sample(i, long), ensure_ascii=False) + "\n")
    seen = {}

    def record(model, tok, requests, spec_for, batch_size, stop, **kwargs):
        for i, (ids, limit) in enumerate(requests):
            seen.setdefault(current, []).append((ids[0].tolist(), limit))
            yield i, types.SimpleNamespace(text="", prompt_tokens=ids.shape[1], seconds=0.0, peak_kv_bytes=0,
                                           final_kv_bytes=0, batch_rows=1)

    monkeypatch.setattr(pred, "answer_all", record)
    args = pred.parse_args(["--data_dir", str(data), "--method", "full", "--max_length", "120",
                            "--output_dir", str(tmp_path / "out")] + (["--e"] if e else []) + flags)
    pred.validate(args)
    args.rank, args.world = 0, 1
    for current in datasets:
        folder = tmp_path / "out" / pred.run_name(args, "full")
        folder.mkdir(parents=True, exist_ok=True)
        run_part(args, pred.dataset_part(args, "full", current, None, tokenizer), "full", folder, None, tokenizer,
                 pred.answer_all)
    return seen, args


@pytest.mark.parametrize("model,weights", MODELS)
@pytest.mark.parametrize("mode", ["lacache", "longbench", "none", "official"])
def test_rule_modes_give_the_reference_ids_for_every_dataset(tmp_path, monkeypatch, model, weights, mode):
    tok = llama_char_tokenizer()
    seen, args = ids_reaching_generate(tmp_path, monkeypatch, tok, ["--model", model, "--chat_template", mode],
                                       DATASETS)
    wrap_name = {"lacache": weights, "official": weights, "longbench": model, "none": None}[mode]
    for dataset in DATASETS:
        expected = [(reference_ids(tok, sample(i, long), dataset, 120, wrap_name), REFERENCE_MAX_GEN[dataset])
                    for i, long in enumerate([False, True])]
        assert seen[dataset] == expected, dataset
    assert args.chat_template == ("lacache" if mode == "official" else mode)


def test_the_two_references_differ_for_llama2_only_in_the_wrapper(tmp_path, monkeypatch):
    tok = llama_char_tokenizer()
    lacache, _ = ids_reaching_generate(tmp_path, monkeypatch, tok, ["--model", "llama2-7b-chat-4k",
                                                                     "--chat_template", "lacache"], ["hotpotqa"])
    thudm, _ = ids_reaching_generate(tmp_path, monkeypatch, tok, ["--model", "llama2-7b-chat-4k",
                                                                   "--chat_template", "longbench"], ["hotpotqa"])
    paper_ids, thudm_ids = lacache["hotpotqa"][0][0], thudm["hotpotqa"][0][0]

    def chars(text):
        return tok(text, add_special_tokens=False).input_ids

    assert thudm_ids == paper_ids[:1] + chars("[INST]") + paper_ids[1:] + chars("[/INST]")  # BOS first


@pytest.mark.parametrize("e", [False, True], ids=["longbench", "longbench-e"])
def test_auto_uses_the_tokenizers_template_and_longbench_e_the_same_prompts(tmp_path, monkeypatch, e):
    tok = llama_char_tokenizer(TEMPLATE)
    if not hasattr(tok, "apply_chat_template"):
        pytest.skip("chat templates need transformers >= 4.34")
    pool = DATASETS_E if e else DATASETS
    seen, _ = ids_reaching_generate(tmp_path, monkeypatch, tok, ["--model", "llama2-7b-chat-4k"], pool, e=e)
    for dataset in pool:
        for (ids, limit), (i, long) in zip(seen[dataset], enumerate([False, True])):
            plain = reference_ids(tok, sample(i, long), dataset, 120, None)
            if dataset in UNWRAPPED:
                assert ids == plain
            else:
                text = tok.decode(plain, skip_special_tokens=True)
                chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
                assert ids == tok(chat, add_special_tokens=False).input_ids
            assert limit == REFERENCE_MAX_GEN[dataset]


def test_run_json_names_the_mode_and_wrapper(tmp_path, monkeypatch):
    import longbench.pred as pred

    args = pred.parse_args(["--model", "llama2-7b-chat-4k", "--chat_template", "longbench", "--max_length", "100"])
    pred.validate(args)
    assert pred.chat_wrapper(args, llama_char_tokenizer()) == {
        "mode": "longbench", "rule_applied_to": "llama2-7b-chat-4k", "wrapper": ["[INST]", "[/INST]"]}
    args.chat_template = "lacache"
    assert pred.chat_wrapper(args, llama_char_tokenizer())["wrapper"] is None
    assert pred.run_name(args, "full").endswith("_chat-lacache")


def test_chatglm_rule_is_refused_in_one_line():
    import longbench.pred as pred
    from lacache_core import ConfigError

    args = pred.parse_args(["--model", "chatglm2-6b", "--model_name_or_path", "THUDM/chatglm2-6b",
                            "--chat_template", "longbench"])
    with pytest.raises(ConfigError, match="--chat_template longbench"):
        pred.validate(args)


@pytest.mark.parametrize("max_length", [119, 120])
@pytest.mark.parametrize("extra", [-1, 0, 1, 2])
def test_middle_truncation_at_its_boundary(max_length, extra):
    from harness.generation import truncate_middle

    tok = llama_char_tokenizer()
    text = ("the quick brown fox " * 10)[:max_length - 1 + extra]  # + BOS: max_length + extra tokens
    ids = tok(text, truncation=False).input_ids
    assert len(ids) == max_length + extra
    expected = text if len(ids) <= max_length else (
        tok.decode(ids[:int(max_length / 2)], skip_special_tokens=True)
        + tok.decode(ids[-int(max_length / 2):], skip_special_tokens=True))
    assert truncate_middle(tok, text, max_length) == expected
