"""GRACE inference: generate a rationale for each text, then pool the hidden states of prompt ⊕ rationale.

This is what a user does with a trained (or an untrained, "Base") model after training:

    encoder = GraceEncoder.from_pretrained("exports/step_1000")
    vectors = encoder.encode(texts, batch_size=16, max_new_tokens=256, seed=0)   # numpy [N, H]

Protocol (docs/algorithm.md, "Evaluation protocol"): the text is rendered with the GRACE system prompt by
:class:`~megatron_grace.data.prompts.PromptBuilder` (cut to ``max_prompt_tokens`` without losing the template), the
model samples a rationale up to its EOS (the EOS token is kept, as in training), and the embedding pools the last
decoder layer after the final norm over every token from the user text on (L_sys = ``pool_start`` excludes the system
prompt). ``rationale=False`` is the paper's Base: the templated prompt alone, pooled the same way.

Determinism: each text samples with its own ``torch.Generator`` seeded from (seed, text), so a text's rationale does
not depend on which other texts share its batch or in which order batches run. Training rollouts key their noise on
(seed, step, sample id, rollout index) instead (:func:`megatron_grace.rollout.row_seed`): an evaluation text has no
step or sample id, and the same text must get the same rationale in every task and batch.

:meth:`GraceEncoder.pool_token_ids` is the pooling step alone (token ids and pool_start in, embedding out): the hook
to compare against the training-time pooled embedding of the Megatron forward for the same tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from megatron_grace.config import DataConfig, RolloutConfig
from megatron_grace.data.prompts import Prompt, PromptBuilder
from megatron_grace.kernels import masked_mean_pool
from megatron_grace.utils import hash_file_into

POOLING_MODES = ("mean", "last", "eos")
# docs/algorithm.md: prompts are cut at the same length at training and evaluation time, rationales at the same cap.
MAX_PROMPT_TOKENS = DataConfig.max_prompt_length
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the model and the text that changes an embedding: part of the cache key."""

    rationale: bool
    max_new_tokens: int
    temperature: float
    seed: int
    pooling: str
    layer: int
    max_prompt_tokens: int


def model_fingerprint(hf_dir: str | os.PathLike) -> str:
    """sha256 over config.json and the weight files' contents: the same export gives the same id wherever it lies."""
    folder = Path(hf_dir)
    files = [folder / "config.json"] + sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not files[0].is_file():
        raise FileNotFoundError(f"{files[0]} not found: --model must be a Hugging Face model folder")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        hash_file_into(digest, path)
    return digest.hexdigest()


def text_seed(seed: int, text: str) -> int:
    """The sampling seed of one text: a function of (seed, text) only, so batching cannot change it."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "little") & (2**63 - 1)


class _PerRowSampler(LogitsProcessor):
    """Samples each row with its own generator and hands generate() a one-hot choice that greedy search then takes.

    HF's own sampling draws the whole batch from the global RNG, which ties a text's rationale to its batch mates.
    Sampling happens on CPU so the per-row CPU generators work whatever device the model is on.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float):
        self.generators = generators
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float().cpu()
        if self.temperature == 0:
            choice = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            choice = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot.scatter_(1, choice.to(scores.device)[:, None], 0.0)
        return one_hot


class EmbeddingCache:
    """Embeddings by key: always in memory, and in an sqlite file under ``cache_dir`` when one is given."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.memory: dict[str, np.ndarray] = {}
        self.db = None
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(Path(cache_dir) / "grace_embeddings.sqlite")
            self.db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB)")

    def get(self, key: str) -> np.ndarray | None:
        if key in self.memory:
            return self.memory[key]
        if self.db is not None:
            row = self.db.execute("SELECT vector FROM embeddings WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self.memory[key] = np.frombuffer(row[0], dtype=np.float32)
                return self.memory[key]
        return None

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        self.memory.update(items)
        if self.db is not None:
            self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                                [(k, v.astype(np.float32).tobytes()) for k, v in items.items()])
            self.db.commit()


@dataclass
class Explanation:
    """What :meth:`GraceEncoder.explain` returns: per text its rationale, and [N, N] cosine similarities."""

    texts: list[str]
    rationales: list[str]
    rationale_tokens: list[int]
    truncated: list[bool]  # the rationale hit max_new_tokens before its EOS
    similarity_with_rationale: np.ndarray
    similarity_without_rationale: np.ndarray
    settings: dict


def _cosine_matrix(vectors: torch.Tensor) -> np.ndarray:
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    return (unit @ unit.T).numpy()


class GraceEncoder:
    """A causal LM used as a GRACE embedder (see the module docstring)."""

    def __init__(self, model, tokenizer, *, model_id: str, pooling: str = "mean", layer: int = -1,
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS, cache_dir: str | os.PathLike | None = None):
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        num_layers = model.config.num_hidden_layers
        if not -num_layers - 1 <= layer <= num_layers:
            raise ValueError(f"layer {layer} out of range for a {num_layers}-layer model (0 = embeddings, -1 = last)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer)
        self.model_id = model_id
        self.pooling = pooling
        self.layer = layer
        self.max_prompt_tokens = max_prompt_tokens
        self.cache = EmbeddingCache(cache_dir)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        if not self.eos_token_ids:
            raise ValueError(f"{tokenizer.name_or_path}: neither the generation config nor the tokenizer names an EOS")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kwargs) -> "GraceEncoder":
        """Load an HF folder (a GRACE export or any chat LM). Defaults: CUDA in bf16 if present, else CPU in fp32."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device)
        return cls(model, tokenizer, model_id=model_fingerprint(hf_dir), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def embedding_dim(self) -> int:
        return self.model.config.hidden_size

    def cache_key(self, text: str, settings: EncodeSettings) -> str:
        payload = json.dumps({"model": self.model_id, "settings": asdict(settings), "text": text}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def encode(self, texts: Sequence[str], *, batch_size: int = 16, rationale: bool = True,
               max_new_tokens: int = RolloutConfig.max_response_length, temperature: float = 1.0, seed: int = 0,
               normalize: bool = True, show_progress: bool = False) -> np.ndarray:
        """Embed ``texts`` → float32 numpy [N, H]; cached per (model, text, settings), so repeats cost nothing."""
        if not rationale:  # generation settings cannot change a Base embedding: one cache entry for all of them
            max_new_tokens, temperature, seed = 0, 0.0, 0
        settings = EncodeSettings(rationale, max_new_tokens, float(temperature), seed, self.pooling, self.layer,
                                  self.max_prompt_tokens)
        keys = [self.cache_key(text, settings) for text in texts]
        missing = sorted({k: t for k, t in zip(keys, texts) if self.cache.get(k) is None}.items())
        if missing:
            prompts = {key: self.prompts.build(text, self.max_prompt_tokens, truncate=True) for key, text in missing}
            # Longest first: similar lengths share a batch (little padding) and an out-of-memory shows up at once.
            order = sorted(missing, key=lambda item: -len(prompts[item[0]]))
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            if show_progress:
                from tqdm.auto import tqdm
                batches = tqdm(batches, desc="GRACE encode", unit="batch")
            for batch in batches:
                batch_prompts = [prompts[key] for key, _ in batch]
                seeds = [text_seed(seed, text) for _, text in batch]
                pooled = self._embed_prompts(batch_prompts, settings, seeds)
                self.cache.put_many({key: vector for (key, _), vector in zip(batch, pooled.numpy())})
        vectors = np.stack([self.cache.get(k) for k in keys]) if keys else np.zeros((0, self.embedding_dim),
                                                                                    np.float32)
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)

    def explain(self, texts: Sequence[str], *, max_new_tokens: int = 256, temperature: float = 1.0,
                seed: int = 0) -> "Explanation":
        """Each text's rationale and the cosine-similarity matrices of the texts' embeddings with and without it.

        The rationale is the one :meth:`encode` samples for the same ``seed`` (a text's seed derives from the text), so
        the "with" matrix is that of ``encode(texts, rationale=True, ...)`` and the "without" one the Base's."""
        prompts = [self.prompts.build(text, self.max_prompt_tokens, truncate=True) for text in texts]
        rationales = self.generate_rationales(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                              seeds=[text_seed(seed, text) for text in texts])
        with_rationale = self._pool_prompts(prompts, rationales)
        without_rationale = self._pool_prompts(prompts, None)
        return Explanation(
            texts=list(texts),
            rationales=[self.tokenizer.decode(r, skip_special_tokens=True) for r in rationales],
            rationale_tokens=[len(r) for r in rationales],
            truncated=[not r or r[-1] not in self.eos_token_ids for r in rationales],
            similarity_with_rationale=_cosine_matrix(with_rationale),
            similarity_without_rationale=_cosine_matrix(without_rationale),
            settings={"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                      "pooling": self.pooling, "layer": self.layer, "model": self.model_id})

    def _embed_prompts(self, prompts: list[Prompt], settings: EncodeSettings, seeds: list[int]) -> torch.Tensor:
        rationales = None
        if settings.rationale:
            rationales = self.generate_rationales(prompts, max_new_tokens=settings.max_new_tokens,
                                                  temperature=settings.temperature, seeds=seeds)
        return self._pool_prompts(prompts, rationales)

    def _pool_prompts(self, prompts: list[Prompt], rationales: list[list[int]] | None) -> torch.Tensor:
        """Pooled embeddings of prompt ⊕ rationale (prompt alone where ``rationales`` is None)."""
        sequences = [list(p.input_ids) for p in prompts]
        if rationales is not None:
            sequences = [s + r for s, r in zip(sequences, rationales)]
        if self.pooling == "eos":
            # EOS pooling reads the EOS token's state; Base prompts and cut-off rationales get one appended.
            sequences = [s if s[-1] in self.eos_token_ids else s + [self.eos_token_ids[0]] for s in sequences]
        return self.pool_token_ids(sequences, [p.pool_start for p in prompts])

    @torch.no_grad()
    def generate_rationales(self, prompts: list[Prompt], *, max_new_tokens: int, temperature: float,
                            seeds: list[int]) -> list[list[int]]:
        """Sample one rationale per prompt: tokens up to and including the first EOS (all of them if none came)."""
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token is generated at the same position.
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p.input_ids) for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos_token_ids,
                                  pad_token_id=self.pad_token_id)
        output = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            generation_config=config, logits_processor=LogitsProcessorList([_PerRowSampler(generators, temperature)]),
        )
        rationales = []
        for row in output[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.eos_token_ids), len(row))
            rationales.append(row[:end])
        return rationales

    @torch.no_grad()
    def pool_token_ids(self, sequences: Sequence[Sequence[int]], pool_starts: Iterable[int]) -> torch.Tensor:
        """Pooled embeddings (float32 [B, H], not normalised) of full token sequences, pooled from ``pool_start`` on.

        ``mean``: masked mean over tokens [pool_start, len); ``last`` / ``eos``: the state of the final token.
        The hidden states are those of ``self.layer``: -1 is the last decoder layer after the final norm.
        """
        lengths = torch.tensor([len(s) for s in sequences])
        starts = torch.tensor(list(pool_starts))
        if bool(((starts < 0) | (starts >= lengths)).any()):
            raise ValueError(f"every pool_start must index a token of its sequence: {starts.tolist()} vs lengths "
                             f"{lengths.tolist()}")
        width = int(lengths.max())
        # Right padding: positions stay 0..len-1 as in training; padded positions are masked from attention and pool.
        input_ids = torch.tensor([list(s) + [self.pad_token_id] * (width - len(s)) for s in sequences])
        positions = torch.arange(width)[None, :]
        attention_mask = (positions < lengths[:, None]).long()
        hidden = self.hidden_states(input_ids.to(self.device), attention_mask.to(self.device))
        if self.pooling == "mean":
            pool_mask = (positions >= starts[:, None]) & (positions < lengths[:, None])
            return masked_mean_pool(hidden, pool_mask.to(self.device)).float().cpu()
        return hidden[torch.arange(len(sequences)), (lengths - 1).to(self.device)].float().cpu()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S, H] states of ``self.layer``. HF's last-layer state is taken after the final norm (as in training)."""
        backbone = self.model.get_decoder()
        if self.layer == -1:
            return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return outputs.hidden_states[self.layer]
