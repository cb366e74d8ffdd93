"""Scaffolding shared by ``tests/`` and ``bench/``, outside the job code: the generated executors and
stand-in model stages (:mod:`ragseg.testing.generated`), moto's local S3 server
(:mod:`ragseg.testing.s3`). The library never imports this package (a layering contract, make lint)."""
