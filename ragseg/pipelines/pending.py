"""The pending listing of a folder source (the 10M-object buckets), streamed a batch of pages at a time.

:func:`list_pending` lists the folder in key order (:func:`ragseg.sources.folder.iter_tables`), filters
each batch against the committed image ids (:class:`ragseg.idset.IdSet`) and appends it to the pending
listing file (:class:`ragseg.pipelines.listing.ListingWriter`): memory is the ids plus a batch.

Its work is per listed object (each page's request and parsing, a regex per id, the filter, the
write: about 6 us an object, a minute for 10M), so a job does not run it on its driver:
:func:`list_pending_remote` runs it as one Ray task on the driver's node (the same file system view
as the driver, so a local output folder works as before) and the driver only waits. A
:class:`~ragseg.errors.UserError` raised there (an empty folder, a store that cannot list) reaches
the driver as itself, one line; a Ctrl-C while it runs cancels the task.
"""

from __future__ import annotations

import time

from ragseg.config import RayConfig, SourceConfig
from ragseg.errors import UserError


def list_pending(out: str, source: SourceConfig, done_ids, per_piece: int, errors: list[dict]):
    """(the written :class:`~ragseg.pipelines.listing.Listing`, images listed): the folder's images
    that ``done_ids`` (an Arrow string array of committed image ids, or None) do not cover."""
    import pyarrow as pa

    from ragseg.idset import IdSet
    from ragseg.pipelines import listing
    from ragseg.sources import folder, no_images_message, register_storage_options, row_schema

    c0 = time.process_time()
    register_storage_options(source)
    done = IdSet(done_ids) if done_ids is not None and len(done_ids) else None
    w = listing.ListingWriter(out, row_schema(), per_piece)
    listed = 0
    try:
        for t in folder.iter_tables(source, errors):
            listed += t.num_rows
            if done is not None:
                t = t.filter(pa.array(~done.contains(t.column("image_id"))))
            w.add(t)
        if listed == 0:  # nothing for the job to do is a mistake to report, as list_table does
            raise UserError(no_images_message(source, errors))
    except BaseException:
        w.abort()
        raise
    lst = w.close()
    lst.cpu_s = time.process_time() - c0
    return lst, listed


def _task(out: str, source: SourceConfig, done_ids, per_piece: int):
    errors: list[dict] = []
    lst, listed = list_pending(out, source, done_ids, per_piece, errors)
    return lst, listed, errors


def list_pending_remote(out: str, source: SourceConfig, done_ids, per_piece: int, errors: list[dict],
                        ray_cfg: RayConfig):
    """:func:`list_pending` as one Ray task on this driver's node; Ray is started if it is not. The task
    reserves no CPU (like the listing's read tasks): a head node started with ``--num-cpus 0``, as
    clusters often are, still runs it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ragseg.runtime import init_ray

    init_ray(ray_cfg)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ids_ref = ray.put(done_ids)
    ref = ray.remote(_task).options(num_cpus=0, max_retries=0, scheduling_strategy=here,
                                    name="ragseg-list-pending").remote(out, source, ids_ref, per_piece)
    try:
        lst, listed, errs = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
    except BaseException:  # a Ctrl-C: the task stops too
        ray.cancel(ref, force=True)
        raise
    errors.extend(errs)
    return lst, listed
