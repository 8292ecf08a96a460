"""Frozen text conditioning: a Hugging Face T5 encoder (or another encoder model) loaded from a local folder.

CogVideoX conditions on T5 v1.1 XXL: every caption is tokenized to exactly 226 tokens (truncated or padded), and
all 226 output vectors go to the transformer. Two details matter for parity with the released weights:
  * the original passes no attention mask to T5, so pad positions get (non-zero) embeddings that the DiT was
    trained to see; ``use_attention_mask=False`` (default) reproduces that. The mask is still returned.
  * guidance and caption dropout use the embedding of the empty caption "", computed once and cached here.

Accepted folder layouts (nothing is ever downloaded):
  * a model folder: config.json + weights (*.safetensors or pytorch_model*.bin) + tokenizer files;
  * a diffusers pipeline folder (as CogVideoX is released): text_encoder/ and tokenizer/ subfolders.

``build_tiny_t5`` writes a tiny random T5 encoder in the same format, for tests and the CPU demo: with a byte-level
tokenizer (ByT5, no vocabulary file) or, given a list of words, a word-level one. Words matter for a tiny DiT: with
bytes it must first learn to read "red" out of three random character embeddings; with words every word is one
token with its own embedding, as a real T5's sentencepiece vocabulary gives for common words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_MAX_LENGTH = 226
_T5_TYPES = ("t5", "mt5", "umt5")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def _resolve_folders(path: str | Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a model folder or a diffusers pipeline folder; clear errors otherwise."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"text encoder path {str(root)!r} does not exist (expected a local folder; nothing is downloaded)"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"text encoder path {str(root)!r} is not a folder")
    if (root / "text_encoder" / "config.json").is_file():
        model_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
    else:
        model_dir, tokenizer_dir = root, root
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in text encoder path {str(root)!r}: expected a Hugging Face model folder "
            "(config.json + *.safetensors + tokenizer files) or a pipeline folder with text_encoder/ and tokenizer/"
        )
    if not any(any(model_dir.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise FileNotFoundError(f"no model weights (*.safetensors or pytorch_model*.bin) in {str(model_dir)!r}")
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer (tokenizer_config.json) in {str(tokenizer_dir)!r}")
    return model_dir, tokenizer_dir


def _load_encoder(model_dir: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """The encoder stack only: T5-family checkpoints (even full encoder-decoder ones) load as T5EncoderModel."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if config.model_type in _T5_TYPES:
        return T5EncoderModel.from_pretrained(model_dir, **kwargs)
    model = AutoModel.from_pretrained(model_dir, **kwargs)
    if getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model


class TextEncoder:
    """Tokenize and encode captions to fixed-length embeddings with a frozen encoder (inference only).

    Not an nn.Module on purpose: it must never end up among the trained (or ZeRO-partitioned) parameters.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, use_attention_mask: bool = False
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if getattr(tokenizer, "pad_token_id", 0) is None:
            # every caption is padded to max_length (as the trained model saw them); another token in its place
            # would change the embeddings
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no padding token; captions are padded "
                             f"to {max_length} tokens: use the tokenizer the model was trained with (T5's pads with "
                             f"<pad>)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        use_attention_mask: bool = False,
    ) -> TextEncoder:
        """Load from a local folder (see the module docstring for the layouts).

        ``dtype``: float32 or bfloat16; T5 v1.1 is known to overflow to inf/NaN in float16.
        """
        from transformers import AutoTokenizer

        model_dir, tokenizer_dir = _resolve_folders(path)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = _load_encoder(model_dir, dtype).to(device)
        return cls(model, tokenizer, max_length, use_attention_mask)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        self._empty = None  # recomputed on the new device / in the new dtype
        return self

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, mask), int64 [B, max_length] each; longer captions are truncated, shorter ones padded."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got a single str")
        if len(captions) == 0:
            raise ValueError('captions is empty: expected at least one caption (use "" for the empty caption)')
        batch = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def encode(self, captions: Sequence[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, max_length, D], mask [B, max_length]) on the encoder's device; batched to bound memory."""
        ids, mask = self.tokenize(captions)
        outputs = []
        for start in range(0, ids.shape[0], batch_size):
            chunk_ids = ids[start : start + batch_size].to(self.device)
            chunk_mask = mask[start : start + batch_size].to(self.device) if self.use_attention_mask else None
            outputs.append(self.model(input_ids=chunk_ids, attention_mask=chunk_mask).last_hidden_state)
        return torch.cat(outputs), mask.to(self.device)

    def empty_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding [1, max_length, D], mask [1, max_length]) of the empty caption, computed once and cached."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def drop_captions(
        self, embeddings: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the rows where ``drop`` [B] is True by the empty-caption embedding (caption dropout)."""
        empty, empty_mask = self.empty_embedding()
        keep = ~drop.to(device=embeddings.device, dtype=torch.bool)
        embeddings = torch.where(keep[:, None, None], embeddings, empty.to(embeddings.dtype))
        mask = torch.where(keep[:, None], mask, empty_mask.to(mask.dtype))
        return embeddings, mask


def build_tiny_t5(
    path: str | Path,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int | None = None,
    seed: int = 0,
    vocabulary: Sequence[str] | None = None,
) -> Path:
    """Write a tiny random T5 encoder + tokenizer to ``path`` with save_pretrained; returns the path.

    ``vocabulary``: None for the byte-level ByT5 tokenizer, or words (or whole captions, split on whitespace and
    punctuation, lower-cased) for a word-level tokenizer with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 and
    ``</s>`` appended to every caption, as T5 does. Same seed, same arguments -> identical weights. The caller's
    global RNG state is left untouched.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    tokenizer = ByT5Tokenizer() if vocabulary is None else word_level_tokenizer(vocabulary)
    config = T5Config(
        vocab_size=len(tokenizer),  # ByT5: 256 bytes + 3 specials + 125 extra ids
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff or 2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # as in T5 v1.1, which CogVideoX uses
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_level_tokenizer(texts: Sequence[str]):
    """A T5-style word-level tokenizer over the words of ``texts``: lower-cased, split on whitespace and punctuation,
    ids in first-seen order after ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; ``</s>`` is appended to every input.

    Saved with save_pretrained it is a tokenizer.json that ``AutoTokenizer`` loads with nothing else installed.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise TypeError("vocabulary must be a list of words or captions, got a single str")
    split = pre_tokenizers.Whitespace()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text.lower()):
            vocab.setdefault(word, len(vocab))
    if len(vocab) == 3:
        raise ValueError("vocabulary has no words")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
