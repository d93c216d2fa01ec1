"""The seed paper's language model, small (Shazeer et al. 2017, §5): embedding -> LSTM -> projection
-> LSTM -> softmax. moeify turns the projection between the LSTMs into an MoE applied to every
time step at once (batch x time flattened into tokens).

    python examples/lstm_lm.py
    moeify convert examples/lstm_lm.py --num-experts 8 --top-k 2 -o out/lstm_lm

`build_model(ffn=True)` puts a Linear -> ReLU -> Linear between the LSTMs instead (an MoE of FFNs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D_EMB, D_HIDDEN, D_FF = 100, 32, 48, 64


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d_emb: int = D_EMB, d_hidden: int = D_HIDDEN, ffn: bool = False,
                 proj_size: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_emb)
        self.lstm1 = nn.LSTM(d_emb, d_hidden, batch_first=True, proj_size=proj_size)
        d_mid = proj_size or d_hidden
        self.drop = nn.Dropout(dropout)
        if ffn:
            self.between = nn.Sequential(nn.Linear(d_mid, D_FF), nn.ReLU(), nn.Linear(D_FF, d_emb))
        else:
            self.between = nn.Linear(d_mid, d_emb)  # the projection the paper replaces with an MoE
        self.lstm2 = nn.LSTM(d_emb, d_hidden, batch_first=True)
        self.decoder = nn.Linear(d_hidden, vocab)

    def forward(self, ids):
        h, _ = self.lstm1(self.embed(ids))
        h = self.between(self.drop(h))
        h, _ = self.lstm2(h)
        return self.decoder(self.drop(h))

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int):
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, self(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build_model(ffn: bool = False, proj_size: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return LSTMLM(ffn=ffn, proj_size=proj_size).eval()


def example_inputs():
    return (torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)),)


if __name__ == "__main__":
    import moeify

    dense = build_model()
    (ids,) = example_inputs()
    result = moeify.convert(dense, moeify.MoEConfig(num_experts=8, top_k=2), example_inputs=(ids,))
    print(result.report)
    print("greedy continuation, dense:", dense.generate(ids[:1, :4], 8)[0].tolist())
    print("greedy continuation, MoE:  ", result.model.generate(ids[:1, :4], 8)[0].tolist())
    import warnings

    with warnings.catch_warnings():  # torch's note that oneDNN has no projected LSTM (it falls back, same result)
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
        projected = moeify.convert(build_model(proj_size=16), moeify.MoEConfig(), example_inputs=(ids,))
    print("\nwith nn.LSTM(proj_size=16) the LSTM's own projection is left alone:")
    print("\n".join(f"  - {s}" for s in projected.report.skipped if s.where == "lstm1"))
