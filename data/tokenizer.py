"""The tokenizers a run can name (`tokenizer` key): GPT-2's BPE, built offline from a local copy
of its ranks when possible, and raw UTF-8 bytes."""

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from data.shards import EOT_TOKEN

# GPT-2's ranks are byte-identical to r50k_base; this is the hash of that file.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SHIPPED_RANKS = Path(__file__).with_name("gpt2.tiktoken")


def _whisper_ranks():
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "assets" / "gpt2.tiktoken"


def _verified(path):
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise ValueError(f"GPT-2 ranks file {path} has sha256 {digest}, expected {GPT2_RANKS_SHA256}")
    return path


@cache
def _gpt2_decoder():
    return gpt2_encoding()[0]


def gpt2_encoding(ranks_path=None):
    """Return (encoding, source): GPT-2's tiktoken encoding and where its ranks came from.

    Tried in order: `ranks_path`, the copy shipped in this repository, the copy inside an
    installed openai-whisper, and last tiktoken's own "gpt2" (which downloads on first use).
    tiktoken is imported here, where GPT-2's ids are first read as text: a run, a benchmark or
    gpu_check on the byte tokenizer, or on token shards alone, does not need it.
    """
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    candidates = [ranks_path] if ranks_path is not None else [SHIPPED_RANKS, _whisper_ranks()]
    for path in candidates:
        if path is not None and Path(path).is_file():
            encoding = tiktoken.Encoding(
                name="gpt2",
                pat_str=r50k_pat_str,
                mergeable_ranks=load_tiktoken_bpe(str(_verified(path))),
                special_tokens={"<|endoftext|>": EOT_TOKEN},
                explicit_n_vocab=EOT_TOKEN + 1,
            )
            return encoding, f"{path} (sha256 verified)"
    if ranks_path is not None:
        raise FileNotFoundError(f"GPT-2 ranks file {ranks_path} does not exist")
    return tiktoken.get_encoding("gpt2"), "tiktoken's gpt2 (downloaded or cached)"


@dataclass(frozen=True)
class Tokenizer:
    """What a run needs of a tokenizer: how many ids it has, the id that starts each document,
    how ids read as text, and how text reads as ids (for evaluation)."""

    vocab_size: int
    eot: int
    decode_ids: object
    encode_text: object

    def decode(self, ids):
        """The text of `ids`."""
        return self.decode_ids(ids)

    def encode(self, text):
        """The ids of `text`, with no document separator; special tokens are read as plain text."""
        return self.encode_text(text)


# Byte 0 never occurs in text, so it marks where each document starts.
BYTES_EOT = 0


def encode_bytes(text):
    """One document as byte ids: the separator, then the text's UTF-8 bytes."""
    return [BYTES_EOT, *text.encode("utf-8")]


def _decode_bytes(ids):
    return bytes(i for i in ids if i != BYTES_EOT).decode("utf-8", errors="replace")


TOKENIZERS = {
    "gpt2": Tokenizer(
        EOT_TOKEN + 1,
        EOT_TOKEN,
        lambda ids: _gpt2_decoder().decode(ids),
        lambda text: _gpt2_decoder().encode_ordinary(text),
    ),
    # 256 ids: the embedding and lm_head are tiny, so the hidden matrices carry the compute.
    "bytes": Tokenizer(256, BYTES_EOT, _decode_bytes, lambda text: list(text.encode("utf-8"))),
}
