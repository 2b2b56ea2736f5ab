"""Writes docs/configuration.md from the jobs' typed configs (`make docs/configuration.md`; a test checks they
agree)."""

from pipeline.backfill import BackfillConfig
from pipeline.export import ExportConfig
from pipeline.serve import ServeConfig
from pipeline.transcribe import TranscribeConfig

HEAD = """# Configuration

Every option of the jobs, generated from their typed configs (`pipeline/transcribe.py`, `pipeline/backfill.py`,
`pipeline/serve.py`, `pipeline/export.py`) by `make docs/configuration.md`; `tests/test_docs.py` checks that this
page is up to date. Each option is also a key of the YAML file `--config` reads (`num_beams: 5`), and a field of the
config in Python (`TranscribeConfig(manifest=..., output=..., model=...)`); the command line wins over the file.
"""


def page() -> str:
    return "\n".join(
        [
            HEAD,
            "## `s2t transcribe MANIFEST OUTPUT`\n",
            TranscribeConfig.options_table(skip=("manifest", "output")),
            "## `s2t backfill`\n",
            "Every option of `s2t transcribe` (as `--manifest` and `--output`), except `--tgt-lang`, and:\n",
            BackfillConfig.options_table(skip=tuple(TranscribeConfig.model_fields)),
            "## `s2t serve`\n",
            ServeConfig.options_table(),
            "## `s2t export OUTPUT`\n",
            ExportConfig.options_table(skip=("output",)),
        ]
    )


if __name__ == "__main__":
    print(page(), end="")
