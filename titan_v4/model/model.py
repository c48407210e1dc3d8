"""DeepSeek-V4 transformer in torchtitan's model layout.

Data flow (shapes with B batch, S sequence, hc = hc_mult residual streams, D = dim):

    tokens [B,S] -> tok_embeddings -> copy into hc streams [B,S,hc,D]
    -> layers (block.py: mHC collapse -> RMSNorm -> Attention -> mHC expand, then the same around the MoE)
    -> hc_head (HyperHead: streams -> [B,S,D]) -> norm -> output [B,S,vocab]
    (+ MTP blocks on the final streams, see mtp.py)

The math follows HF transformers' modeling_deepseek_v4.py (the numerical oracle of the tests) and
the official inference code; parameter names follow the official checkpoint inside torchtitan's
module names (`attention`, `moe`, `attention_norm`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.model import ModelProtocol

from .args import DeepSeekV4ModelArgs
from .attn_kinds import SWA
from .block import TransformerBlock
from .mhc import HyperHead
from .mtp import MTPBlock
from .precision import matmul_dtype
from .rope import compress_rope_table, main_rope_table


class DeepSeekV4Model(ModelProtocol):
    """DeepSeek-V4 (Flash / Pro) for torchtitan.

    `forward(tokens)` returns logits [B, S, vocab] when `mtp_depth == 0`, else the flat tuple
    `(logits, mtp_logits_1, ..., mtp_logits_D)`, one [B, S, vocab] tensor per MTP depth (position i
    of depth k predicts token i + 1 + k; see mtp.py and the loss in loss.py). Flat, because a
    pipeline stage's output may only hold tensors.

    Pipeline stages (titan_v4/infra/pipeline.py) are copies of this model with some top-level
    modules removed (None, or layers / mtp entries deleted). A stage without `tok_embeddings` takes,
    and a stage without `output` returns, the stage boundary tensor [B, S, hc + mtp_depth, D]: the
    hc residual streams followed by the embedded next tokens of each MTP depth, which the first
    stage computes for the MTP blocks on the last one (see `forward`).
    """

    def __init__(self, model_args: DeepSeekV4ModelArgs):
        super().__init__(model_args)
        self.model_args = model_args
        self.hc_mult = model_args.hc_mult
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        # cos/sin tables: "main" for sliding-window-only layers and MTP, "compress" (YaRN) otherwise.
        self.register_buffer("rope_main", main_rope_table(model_args), persistent=False)
        self.register_buffer("rope_compress", compress_rope_table(model_args), persistent=False)
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerBlock(i, model_args, kind, model_args.is_hash_layer(i))
                for i, kind in enumerate(model_args.attn_types)
            }
        )
        self.hc_head = HyperHead(model_args)
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        self.mtp = nn.ModuleDict(
            {str(k): MTPBlock(model_args.n_layers + k, model_args) for k in range(model_args.mtp_depth)}
        )

    def rope_for(self, attn_type: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.rope_main if attn_type == SWA else self.rope_compress
        if seq_len > table.shape[1]:
            raise ValueError(f"sequence length {seq_len} exceeds the RoPE table ({table.shape[1]} = training.seq_len)")
        return table[0, :seq_len], table[1, :seq_len]

    def forward(
        self,
        tokens: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_masks=None,
        positions: torch.Tensor | None = None,
    ):
        """tokens [B, S] int ids on the first pipeline stage (the boundary tensor
        [B, S, hc + mtp_depth, D] after it); token_ids [B, S]: the ids, needed by hash-routed layers
        on later stages (default: tokens).

        doc_ids [B, S] integer: the document layout of packed sequences, a document being a maximal
        run of equal consecutive labels (the dataloader's, titan_v4/data/documents.py); None = one
        document per row. With it nothing crosses a document boundary in any layer or MTP block
        (see Attention and Compressor). Positions do not restart at a document: RoPE makes the
        attention depend on position differences only, and the compressors' windows stay on the
        sequence's grid, so a document that starts at a multiple of 128 tokens gets the logits it
        gets alone (up to the rounding of the rotary tables). torchtitan's ``attention_masks`` /
        ``positions`` are not used by V4 and are refused.
        """
        if attention_masks is not None or positions is not None:
            raise NotImplementedError(
                "DeepSeek-V4 takes its document layout as doc_ids; torchtitan's attention_masks / positions are not used"
            )
        depth = self.model_args.mtp_depth
        if self.tok_embeddings is not None:
            token_ids = tokens if token_ids is None else token_ids
            h = self.tok_embeddings(tokens)
            # Under single-device autocast (fp32 parameters) the streams are kept in autocast's dtype,
            # as FSDP's bf16 parameters keep them: the mHC kernels move them at that width.
            dtype = matmul_dtype(h)
            h = h.to(dtype).unsqueeze(2).expand(-1, -1, self.hc_mult, -1)
            mtp_embeds = self.embed_mtp_tokens(token_ids).to(dtype) if depth else None
        elif depth:
            h, mtp_embeds = tokens.split((self.hc_mult, depth), dim=2)
            h = h.contiguous()  # sliced out of the boundary tensor: one block again
        else:
            h, mtp_embeds = tokens, None
        seq_len = h.shape[1]
        for layer in self.layers.values():
            h = layer(h, *self.rope_for(layer.attn_type, seq_len), token_ids, doc_ids)
        if self.output is None:  # not the last pipeline stage: one tensor crosses the boundary
            return h if mtp_embeds is None else torch.cat((h, mtp_embeds), dim=2)
        logits = self.output(self.norm(self.hc_head(h)))
        if len(self.mtp) == 0:
            return logits
        cos, sin = self.rope_for(SWA, seq_len)
        mtp_logits = []
        for k, block in enumerate(self.mtp.values()):
            h = block(h, mtp_embeds[:, :, k], cos, sin, doc_ids)
            mtp_logits.append(self.output(block.norm(block.hc_head(h))))
        return (logits, *mtp_logits)

    def embed_mtp_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S, mtp_depth, D]: slot k holds, at position i, the embedding of token
        i + k + 1, which MTP depth k + 1 takes as its input token.

        Computed where the embedding lives (the first pipeline stage) and carried to the MTP blocks
        in the stage boundary tensor, so the embedding's MTP gradient flows back through the
        pipeline into the one embedding parameter. The wrapped-around last positions have no
        target and are ignored by the loss.
        """
        shifted = [torch.roll(token_ids, shifts=-(k + 1), dims=1) for k in range(self.model_args.mtp_depth)]
        return self.tok_embeddings(torch.stack(shifted, dim=2))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialise every parameter and rebuild every buffer (they are garbage after to_empty)."""
        device = buffer_device or self.rope_main.device
        self.rope_main = main_rope_table(self.model_args, device=device)
        self.rope_compress = compress_rope_table(self.model_args, device=device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights(buffer_device)
        if self.hc_head is not None:
            self.hc_head.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            final_out_std = self.model_args.dim**-0.5
            trunc_normal_(self.output.weight, mean=0.0, std=final_out_std, a=-3 * final_out_std, b=3 * final_out_std)
        if self.mtp is not None:
            for block in self.mtp.values():
                block.init_weights(buffer_device)
