"""The GPT-2 tokenizer, built offline from a local copy of its BPE ranks when possible."""

import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

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


def gpt2_encoding(ranks_path=None):
    """Return (encoding, source): GPT-2's tiktoken encoding and where its ranks came from.

    Tried in order: `ranks_path`, the copy shipped in this repository, the copy inside an
    installed openai-whisper, and last tiktoken's own "gpt2" (which downloads on first use).
    """
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
