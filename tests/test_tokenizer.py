"""The rebuilt tokenizer is Qwen2.5's: the ids the real Qwen tokenizers are published to give, tiktoken's ids on
the shipped ranks, and Qwen2.5-Instruct's chat template output."""
import json
import os

import pytest

from prep.qwen import FIRST_ADDED_ID
from prep.tokenizer import ADDED_TOKENS, default_ranks_path, split_pattern, tokenizer_dir

TEXTS = [
    "性别: 男\n年龄: 48\n主诉: 乙肝阳性\n现病史: 2020-7-14 ALT/AST 109/95 予护肝治疗 HBVDNA 3.06E+4 ；小三阳",
    "体格检查: T36.5℃，P78次/分，R20次/分，BP142/78mmHg。心肺听诊未闻及异常。",
    "The patient's BP was 142/78 mmHg; they'll follow up. I'M FINE, it's OK.",
    "1234567890 3.1415926 -42 1e-5 ０１２３",
    "emoji 😀🩺🏥 and 👨‍👩‍👧 family",
    "odd   whitespace\t\ttabs\r\n\r\nCRLF  \n   trailing   ",
    '{"reason":"1. 主诉…\\n2. 既往史","diseases":"1. 高尿酸血症；2. 皮炎"}',
    "",
    "   ",
    "中英mixed文本with数字123和符号（括号）【方括号】“引号”",
]

# Published ids: each sequence below was produced by a real Hugging Face Qwen tokenizer, not by medkd, and is
# copied from the file named. Qwen1.5, Qwen2 and Qwen2.5 share the 151,643 byte-level tokens and the first three
# added tokens, so all of them are Qwen2.5's ids.
# ggerganov/llama.cpp models/ggml-vocab-qwen2.gguf.inp + .out: Qwen/Qwen1.5-7B's tokenizer.encode(text,
# add_special_tokens=False), written by convert_hf_to_gguf_update.py.
LLAMA_CPP = "llama.cpp"
# huggingface/transformers tests/models/qwen2/test_tokenization_qwen2.py, integration_expected_token_ids of
# Qwen/Qwen2.5-VL-7B-Instruct on the shared tokenizer test string.
TRANSFORMERS_QWEN25 = "transformers-qwen2.5"
# huggingface/transformers tests/models/qwen2/test_tokenization_qwen2.py (4.x), test_tokenizer_integration of
# Qwen/Qwen-tokenizer at revision 5909c8222473b2c73b0b73fb054552cd4ef6a8eb (padding removed).
TRANSFORMERS_QWEN2 = "transformers-qwen2"
# alibaba/rtp-llm rtp_llm/test/tokenizer_test/qwen2_tokenizer_test.py.
RTP_LLM = "rtp-llm"
PUBLISHED = [
    (LLAMA_CPP, "ied 4 ½ months", [1122, 220, 19, 220, 26062, 3951]),
    (LLAMA_CPP, "Führer", [37, 50753, 261]),
    (LLAMA_CPP, "", []),
    (LLAMA_CPP, " ", [220]),
    (LLAMA_CPP, "  ", [256]),
    (LLAMA_CPP, "   ", [262]),
    (LLAMA_CPP, "\t", [197]),
    (LLAMA_CPP, "\n", [198]),
    (LLAMA_CPP, "\n\n", [271]),
    (LLAMA_CPP, "\n\n\n", [1406]),
    (LLAMA_CPP, "\t\n", [1572]),
    (LLAMA_CPP, "Hello world", [9707, 1879]),
    (LLAMA_CPP, " Hello world", [21927, 1879]),
    (LLAMA_CPP, "Hello World", [9707, 4337]),
    (LLAMA_CPP, " Hello World", [21927, 4337]),
    (LLAMA_CPP, " Hello World!", [21927, 4337, 0]),
    (LLAMA_CPP, "Hello, world!", [9707, 11, 1879, 0]),
    (LLAMA_CPP, " Hello, world!", [21927, 11, 1879, 0]),
    (LLAMA_CPP, " this is 🦙.cpp", [419, 374, 11162, 99, 247, 13, 10821]),
    (LLAMA_CPP, "w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
    (LLAMA_CPP, "нещо на Български", [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),
    (LLAMA_CPP,
     "កាន់តែពិសេសអាចខលចេញ",
     [146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272,
      97529, 227, 147805, 148301, 147270, 44258, 223, 146848]),
    (LLAMA_CPP,
     "🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis concatenated) ✅ (only emoji that has its own token)",
     [145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 320, 3243,
      42365, 429, 702, 1181, 1828, 3950, 8]),
    (LLAMA_CPP, "Hello", [9707]),
    (LLAMA_CPP, " Hello", [21927]),
    (LLAMA_CPP, "  Hello", [220, 21927]),
    (LLAMA_CPP, "   Hello", [256, 21927]),
    (LLAMA_CPP, "    Hello", [262, 21927]),
    (LLAMA_CPP, "    Hello\n    Hello", [262, 21927, 198, 262, 21927]),
    (LLAMA_CPP, " (", [320]),
    (LLAMA_CPP, "\n =", [198, 284]),
    (LLAMA_CPP, "' era", [6, 11385]),
    (LLAMA_CPP,
     "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
     [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20,
      16, 35727, 21216]),
    (LLAMA_CPP,
     "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis concatenated) ✅ 🦙🦙 "
     "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
     "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
     "sure I'll make it, 'D you like some tea? We'Ve a'lL",
     [198, 4710, 14731, 65497, 7847, 1572, 2303, 78672, 10947, 145836, 320, 8252, 8, 26525, 114, 378, 235, 149921,
      30543, 320, 35673, 99066, 97534, 8, 25521, 227, 11162, 99, 247, 149955, 220, 18, 220, 18, 18, 220, 18, 18, 18,
      220, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 18, 220,
      18, 18, 18, 18, 18, 18, 18, 18, 220, 18, 13, 18, 220, 18, 496, 18, 220, 18, 1112, 18, 220, 146394, 97529, 241,
      44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272, 97529, 227, 144534, 937,
      104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16, 35727, 21216, 55460, 53237, 18658, 14144, 1456, 13073,
      63471, 33594, 3038, 133178, 79012, 3355, 4605, 4605, 13874, 13874, 73594, 3014, 3014, 28149, 17085, 2928, 26610,
      7646, 358, 3003, 1012, 364, 83, 813, 566, 594, 1052, 11, 364, 787, 498, 2704, 30, 364, 44, 537, 2704, 358, 3278,
      1281, 432, 11, 364, 35, 498, 1075, 1045, 15243, 30, 1205, 6, 42612, 264, 63866, 43]),
    (TRANSFORMERS_QWEN25,
     "This is a test 😊\nI was born in 92000, and this is falsé.\n生活的真谛是\nHi  Hello\nHi   Hello\n\n \n  \n Hello\n"
     "<s>\nhi<s>there\nThe following string should be properly encoded: Hello.\nBut ird and ปี   ird   ด\nHey how "
     "are you doing",
     [1986, 374, 264, 1273, 26525, 232, 198, 40, 572, 9223, 304, 220, 24, 17, 15, 15, 15, 11, 323, 419, 374, 31932,
      963, 624, 105301, 88051, 116109, 20412, 198, 13048, 220, 21927, 198, 13048, 256, 21927, 271, 48426, 21927, 198,
      44047, 397, 6023, 44047, 29, 18532, 198, 785, 2701, 914, 1265, 387, 10277, 20498, 25, 21927, 624, 3983, 220,
      2603, 323, 220, 54684, 28319, 256, 220, 2603, 256, 220, 37033, 198, 18665, 1246, 525, 498, 3730]),
    (TRANSFORMERS_QWEN2,
     "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides general-purpose "
     "architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural Language Understanding (NLU) and "
     "Natural Language Generation (NLG) with over 32+ pretrained models in 100+ languages and deep interoperability "
     "between Jax, PyTorch and TensorFlow.",
     [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707,
      4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321, 33,
      529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320, 30042,
      38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897, 1948,
      619, 706, 11, 5355, 51, 21584, 323, 94986, 13]),
    (TRANSFORMERS_QWEN2,
     "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
     [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949,
      9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912,
      105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]),
    (TRANSFORMERS_QWEN2,
     "```python\ntokenizer = AutoTokenizer.from_pretrained(\"Qwen/Qwen-tokenizer\")\ntokenizer(\"世界，你好！\")```",
     [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138,
      85593, 445, 99489, 3837, 108386, 6313, 899, 73594]),
    (RTP_LLM, "<|im_start|>hello<|im_end|>", [151644, 14990, 151645]),
    *[(LLAMA_CPP, "3" * n, [18] * n) for n in range(1, 10)],   # Qwen splits every digit
]
# pytorch/torchtune torchtune/models/qwen2/_tokenizer.py QWEN2_SPECIAL_TOKENS and
# torchtune/models/qwen2_5/_tokenizer.py QWEN2_5_SPECIAL_TOKENS.
PUBLISHED_ADDED_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def ranks():
    load = pytest.importorskip("tiktoken.load")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")   # tiktoken would otherwise serve a copy cached by path
        return load.load_tiktoken_bpe(os.fspath(default_ranks_path()))


@pytest.fixture(scope="module")
def tiktoken_encoding(ranks):
    tiktoken = pytest.importorskip("tiktoken")
    special = {content: FIRST_ADDED_ID + offset for offset, (content, _) in enumerate(ADDED_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=split_pattern(), mergeable_ranks=ranks, special_tokens=special)


@pytest.fixture(scope="module")
def tokenizer_json():
    """The built tokenizer.json on its own, as `tokenizers` (and tools other than transformers) read it."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.fspath(tokenizer_dir() / "tokenizer.json"))


@pytest.mark.parametrize(("source", "text", "expected"), PUBLISHED,
                         ids=[f"{source}-{number}" for number, (source, _, _) in enumerate(PUBLISHED)])
def test_encoding_matches_published_qwen_ids(qwen_tokenizer, tokenizer_json, source, text, expected):
    assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer_json.encode(text, add_special_tokens=False).ids == expected
    assert qwen_tokenizer.decode(expected) == text


def test_added_token_ids_match_published_qwen25(qwen_tokenizer, tokenizer_json):
    assert {content: qwen_tokenizer.convert_tokens_to_ids(content) for content, _ in ADDED_TOKENS} == PUBLISHED_ADDED_IDS
    assert {content: tokenizer_json.token_to_id(content) for content, _ in ADDED_TOKENS} == PUBLISHED_ADDED_IDS


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_tiktoken(qwen_tokenizer, tiktoken_encoding, text):
    ours = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == tiktoken_encoding.encode(text)
    assert qwen_tokenizer.decode(ours) == text


def test_encoding_matches_tiktoken_on_real_cases(qwen_tokenizer, tiktoken_encoding, real_cases_path):
    lines = real_cases_path.read_text(encoding="utf-8").splitlines()[::25]
    for line in lines:
        text = json.loads(line)["feature_content"]
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == tiktoken_encoding.encode(text)


def test_known_ids_and_special_tokens(qwen_tokenizer, ranks):
    assert qwen_tokenizer.convert_tokens_to_ids(["system", "user", "assistant"]) == [8948, 872, 77091]
    assert len(qwen_tokenizer) == 151665
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.pad_token == "<|endoftext|>" and qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert qwen_tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151664
    # Special tokens are single ids and survive decoding; <tool_call> is added but not special.
    ids = qwen_tokenizer("<|im_start|>user\nhi<|im_end|><tool_call>", add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 6023, 151645, 151657]
    assert "<tool_call>" not in qwen_tokenizer.all_special_tokens
    assert len(ranks) == 151643


def test_nfc_normalisation(qwen_tokenizer):
    # The three characters whose NFC, NFD, NFKC and NFKD forms all differ (the case transformers' Qwen2 tests use):
    # NFD input encodes exactly as its NFC form, and not as its NFKC form.
    nfd, nfc, nfkc = "\u03d2\u0301\u03d2\u0308\u017f\u0307", "\u03d3\u03d4\u1e9b", "\u038e\u03ab\u1e61"
    encode = lambda text: qwen_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert encode(nfd) == encode(nfc) != encode(nfkc)


def test_chat_template_renders_qwen25(qwen_tokenizer):
    with_system = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛"},
                   {"role": "assistant", "content": '{"reason":"r","diseases":"d"}'}]
    assert qwen_tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\n你是医生。<|im_end|>\n<|im_start|>user\n头痛<|im_end|>\n"
        '<|im_start|>assistant\n{"reason":"r","diseases":"d"}<|im_end|>\n'
    )
    no_system = [{"role": "user", "content": "头痛"}]
    assert qwen_tokenizer.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n头痛<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_tokenizer.apply_chat_template(with_system[:2], tokenize=False, add_generation_prompt=False).endswith(
        "<|im_start|>user\n头痛<|im_end|>\n"
    )
