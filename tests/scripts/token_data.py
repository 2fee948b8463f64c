"""A fixed token dataset for ``data.factory``: the same global batches at any world size when
ranks x batch_size is kept (tests of resuming at another world size)."""
import torch


class Tokens(torch.utils.data.Dataset):
    def __init__(self, samples: int, vocab: int, seq_len: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.tokens = torch.randint(0, vocab, [samples, seq_len + 1], generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int):
        row = self.tokens[index]
        return row[:-1], row[1:]


def tokens(samples: int = 256, vocab: int = 64, seq_len: int = 16) -> Tokens:
    return Tokens(samples, vocab, seq_len)
