"""How much a rebuild that embeds every text again will embed, said before it starts.

The documents are counted; texts per document and characters per text come from the
first :data:`SAMPLE` documents of each collection, mapped as the build maps them (the
filter, chunking and documents that cannot be mapped count as they will). For the
``openai`` kind the tokens are estimated as characters / :data:`CHARS_PER_TOKEN`, the
usual average of OpenAI's tokenizers on English text: an estimate, not a count (no
tokenizer is loaded for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from syncd.config import PipelineSettings
from syncd.errors import PoisonError
from syncd.mapping import Mapper
from syncd.source import ChangeSource

SAMPLE = 200  # documents mapped per collection
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Estimate:
    documents: int
    texts: int
    tokens: int | None  # for the openai kind only

    def describe(self) -> str:
        out = f"about {self.texts} texts to embed ({self.documents} documents)"
        if self.tokens is not None:
            out += f", about {self.tokens} tokens (estimated as characters / {CHARS_PER_TOKEN})"
        return out

    def to_json(self) -> dict[str, Any]:
        return {"documents": self.documents, "texts": self.texts, "tokens_estimate": self.tokens}


def estimate(source: ChangeSource, settings: PipelineSettings) -> Estimate:
    mapper = Mapper(settings)
    documents = 0
    texts = chars = 0.0
    for collection in settings.source_collections:
        count = source.count(collection)
        documents += count
        sampled = n_texts = n_chars = 0
        for batch in source.scan(collection, batch_size=SAMPLE):
            for doc in batch:
                sampled += 1
                if not mapper.matches(doc):
                    continue
                try:
                    records = mapper.map(doc).records
                except PoisonError:
                    continue  # dead-lettered or halted at, not embedded
                n_texts += len(records)
                n_chars += sum(len(record.text) for record in records)
            break
        if sampled:
            texts += n_texts * count / sampled
            chars += n_chars * count / sampled
    tokens = round(chars / CHARS_PER_TOKEN) if settings.embedder.kind == "openai" else None
    return Estimate(documents=documents, texts=round(texts), tokens=tokens)
