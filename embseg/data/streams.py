"""The deterministic item order the loaders share: which items logical stream ``i`` reads in
epoch ``e``, and in which order.

Stream ``i`` of ``n`` reads, in epoch ``e``, a seeded permutation of the shards (every n-th
shard, or every n-th sample when there are fewer shards than streams) through a seeded
shuffle buffer (WebDataset's ``shuffle``). The order is a pure function of (shards, seed,
epoch, stream, n, buffer size), so a resumed loader can replay it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from embseg.data.reading import BadItem, read_shard
from embseg.sampling import repeat_samples

BAD_SAMPLE_POLICIES = ("skip", "fail")


def check_policy(on_bad_sample: str) -> None:
    """ValueError unless ``on_bad_sample`` is one of :data:`BAD_SAMPLE_POLICIES`."""
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, "
                         f"not {on_bad_sample!r}")


def seed_sequence(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts])


def key_number(key: str) -> int:
    """A sample key as a number for seeding (its digits, else a hash of it)."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")


def epoch_items(shards: Sequence[tuple[str, str]], expected: dict[str, list[str]], *,
                stream: int, num_streams: int, epoch: int, seed: int, shuffle_buffer: int,
                shuffle_shards: bool = True,
                factors: dict[str, float] | None = None) -> Iterator[dict | BadItem]:
    """The items of one logical stream in one epoch, in their (seeded) training order.

    ``shards``: (url, name) of every shard in the source's order; ``expected``: the
    manifest's keys by shard name (the shard-cut check; empty: none). ``factors``
    (repeat-factor sampling): each sample comes ``epoch_repeats`` times, the copies entering
    the shuffle buffer one after another (it spreads them apart).
    """
    ordered = list(shards)
    if shuffle_shards:
        order = np.random.default_rng(seed_sequence(seed, epoch, 0x5EED)).permutation(len(shards))
        ordered = [shards[i] for i in order]
    by_shard = len(ordered) >= num_streams
    mine = ordered[stream::num_streams] if by_shard else ordered

    def raw() -> Iterator[dict | BadItem]:
        index = 0
        for url, name in mine:
            for item in read_shard(url, expected.get(name)):
                if by_shard or index % num_streams == stream:
                    yield item
                index += 1

    # THE repeat-factor hook (embseg.sampling): the only place a sample's count is applied
    items = repeat_samples(raw(), factors, seed=seed, epoch=epoch)
    if shuffle_buffer <= 1:
        yield from items
        return
    rng = random.Random(int(seed_sequence(seed, epoch, stream, 0x5F1).generate_state(1)[0]))
    yield from wds.filters.shuffle(bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng)(items)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch tensor; inside a DataLoader worker it is built straight in shared memory.

    A batch stacked in ordinary memory is copied once more into shared memory when the worker
    sends it to the main process; ``default_collate`` allocates the shared block first and
    stacks into it (the loose-file DataLoader path gets the same through its collate).
    """
    return torch.utils.data.default_collate(tensors)
