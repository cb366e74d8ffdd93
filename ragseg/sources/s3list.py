"""Listing the keys under an S3 prefix a page at a time, at a driver cost of about a millisecond a page.

botocore parses every ListObjectsV2 response into dicts, with each key's date, ETag, size and
storage class: 20-60 ms of CPU per 1000-key page, i.e. minutes of the driver's time for a
10M-object bucket, spent on fields a listing of images never reads. Here each page is one GET of a
presigned ListObjectsV2 URL (made by the filesystem's own client: its credentials, endpoint and
region), with ``EncodingType=url`` so that S3 URL-encodes the keys, and the response is read with a
regular expression for the keys and the continuation token only; the next page's request is sent
before this page's keys are handed on. Requests go through aiohttp on s3fs's event loop (one
keep-alive session per listing); throttling and server errors are retried with backoff. When a presigned request cannot be made at all (the first page fails), the listing
falls back to s3fs's paginator (botocore).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from urllib.parse import unquote_plus
from xml.sax.saxutils import unescape

log = logging.getLogger(__name__)

PAGE_KEYS = 1000  # S3's largest page
RETRIES = 6
_KEY = re.compile(r"<Key>([^<]*)</Key>")
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")
_TRUNCATED = re.compile(rb"<IsTruncated>\s*true\s*</IsTruncated>")
_XML_ENTITIES = {"&quot;": '"', "&apos;": "'"}
_RETRY_STATUS = (429, 500, 502, 503, 504)


def next_token(body: bytes) -> str | None:
    """The continuation token of a ListObjectsV2 XML response (XML text), None on its last page."""
    if not _TRUNCATED.search(body):
        return None
    m = _TOKEN.search(body)
    if m is None:
        raise OSError("ListObjectsV2 response is truncated but has no NextContinuationToken")
    return unescape(m.group(1).decode("utf-8"), _XML_ENTITIES)


def page_keys(body: bytes) -> list[str]:
    """The keys of a ListObjectsV2 XML response made with ``EncodingType=url`` (URL-encoded)."""
    return [unquote_plus(k) if ("%" in k or "+" in k) else k for k in _KEY.findall(body.decode("utf-8"))]


def parse_page(body: bytes) -> tuple[list[str], str | None]:
    """(keys, next continuation token or None) of a ListObjectsV2 XML response made with
    ``EncodingType=url`` (keys URL-encoded; the token is XML text)."""
    return page_keys(body), next_token(body)


def _paginator_pages(fs, bucket: str, prefix: str) -> Iterator[list[str]]:
    from fsspec.asyn import sync

    pages = fs._list_pages("list_objects_v2", Bucket=bucket, Prefix=prefix, **fs.req_kw)
    while True:
        try:
            page = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        yield [c["Key"] for c in page.get("Contents", [])]


def iter_key_pages(fs, bucket: str, prefix: str) -> Iterator[list[str]]:
    """The keys under ``s3://bucket/prefix`` in key order, a page (up to 1000) at a time."""
    import asyncio

    import aiohttp
    from fsspec.asyn import sync

    state: dict = {"session": None}

    async def fetch(token: str | None) -> bytes:
        params = {"Bucket": bucket, "Prefix": prefix, "EncodingType": "url", "MaxKeys": PAGE_KEYS}
        if token:
            params["ContinuationToken"] = token
        client = await fs.set_session()
        url = await client.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=3600)
        if state["session"] is None:
            state["session"] = aiohttp.ClientSession()
        err = ""
        for attempt in range(RETRIES):
            if attempt:
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))
            try:
                async with state["session"].get(url) as r:
                    body = await r.read()
                    if r.status == 200:
                        return body
                    err = f"HTTP {r.status}: {body[:300].decode('utf-8', 'replace')}"
                    if r.status not in _RETRY_STATUS:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                err = f"{type(e).__name__}: {e}"
        raise OSError(f"ListObjectsV2 of s3://{bucket}/{prefix} failed: {err}")

    try:
        body = sync(fs.loop, fetch, None)
    except Exception as e:  # noqa: BLE001 - the first page decides which way to list
        log.info("presigned listing unavailable (%s); listing with botocore", e)
        if state["session"] is not None:
            sync(fs.loop, state["session"].close)
        yield from _paginator_pages(fs, bucket, prefix)
        return
    nxt = None
    try:
        while True:
            token = next_token(body)
            # the next page is on its way while this one is parsed and used
            nxt = asyncio.run_coroutine_threadsafe(fetch(token), fs.loop) if token is not None else None
            yield page_keys(body)
            if nxt is None:
                return
            body, nxt = nxt.result(), None
    finally:
        if nxt is not None:
            nxt.cancel()
        if state["session"] is not None:
            sync(fs.loop, state["session"].close)
