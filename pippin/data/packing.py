"""The pipeline's last step: tokenize documents with pippin's tokenizer and pack them into the memory-mapped token
shards the pretraining trainer reads (pippin.data.shards), each document followed by the end-of-document id.

Task r writes `shard-r<r>-<i>.bin` and a partial index `shards-r<r>.json` into the one output folder; the pipeline
merges the partial indexes into `shards.json` in task order once every task is done. Documents are encoded in
batches (the `tokenizers` library's Rust batch encoder). Not here: sequence packing into fixed windows, which the
reader does (`TokenShards.window`), and shuffling, which the trainer does.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.batching import batched

from pippin.data.shards import ShardWriter
from pippin.errors import PippinError
from pippin.model.tokenizer import Tokenizer


def partial_index(rank: int) -> str:
    """The file name of task `rank`'s partial shard index."""
    return f"shards-r{rank:05d}.json"


def tokenizer_folder(spec: str | Path) -> Path:
    """A converted model folder; "default" is the default model's under PIPPIN_HOME."""
    if str(spec) == "default":
        from pippin.model.checkpoint import DEFAULT_MODEL, pippin_home

        return pippin_home() / "models" / DEFAULT_MODEL
    return Path(spec)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    return Tokenizer.load(tokenizer_folder(spec))


class PackShards(PipelineStep):
    """Encodes each document (no BOS) and appends it to task `rank`'s shard writer; yields nothing."""

    type = "🔢 - TOKENIZER"
    name = "🔢 Tokenize + pack"

    def __init__(
        self,
        output_folder: str,
        tokenizer: str = "default",
        eos_token: str = "<|endoftext|>",
        shard_tokens: int = 1 << 24,
        batch_size: int = 256,
    ):
        super().__init__()
        self.output_folder, self.tokenizer, self.eos_token = Path(output_folder), tokenizer, eos_token
        self.shard_tokens, self.batch_size = shard_tokens, batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tok = load_tokenizer(self.tokenizer)
        eos_id = tok.token_id(self.eos_token)
        if eos_id is None:
            raise PippinError(f"the tokenizer at {self.tokenizer} has no {self.eos_token!r} token; set eos_token in the pipeline file")
        writer = ShardWriter(
            self.output_folder,
            vocab_size=tok.vocab_size,
            eos_id=eos_id,
            shard_tokens=self.shard_tokens,
            meta={"tokenizer": str(tokenizer_folder(self.tokenizer).resolve()), "eos_token": self.eos_token},
            prefix=f"shard-r{rank:05d}",
            index_name=partial_index(rank),
        )
        for batch in batched(data or [], self.batch_size):
            with self.track_time("batch"):
                encoded = tok.backend.encode_batch([d.text for d in batch], add_special_tokens=False)
                for enc in encoded:
                    writer.add(enc.ids)
                    self.stat_update("tokens", value=len(enc.ids) + 1)
            self.stat_update("total", value=len(batch))
        writer.close()
        return
        yield  # a generator that yields nothing: the last step of the pipeline
