"""Who handles what: each worker's block of sequences and of rows. Pure arithmetic, the same on every worker."""


def local_share(count: int, rank: int, world_size: int) -> range:
    """The contiguous block of `count` items (calibration sequences) that `rank` handles.

    Sizes differ by at most one, the larger blocks first, so rank 0 always has the most.
    """
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def batch_share(count: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """`rank`'s batches of `count` sequences: the batches are cut from the whole set first and handed out
    whole, so a sequence's batch (and so its forward's rounding) is the same for any number of workers."""
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    mine = local_share(len(batches), rank, world_size)
    return batches[mine.start : mine.stop]
