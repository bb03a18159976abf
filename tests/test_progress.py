"""The progress line: quarter lines off a terminal, silence for quick work, pooch's protocol."""

import io

from pipeline.progress import Progress


def test_progress_prints_quarters_off_terminal():
    stream = io.StringIO()
    bar = Progress(100, "decoding", unit="images", stream=stream, delay=0)

    for _ in range(100):
        bar.update(1)
    bar.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("decoding: 25/100 images ( 25%)")
    assert "ETA" in lines[0]
    assert lines[-1].startswith("decoding: 100/100 images (100%)")
    assert "images/s" in lines[-1]


def test_progress_quiet_within_delay():
    stream = io.StringIO()
    bar = Progress(10, "decoding", stream=stream, delay=60)

    bar.update(10)
    bar.close()

    assert stream.getvalue() == ""


def test_progress_as_pooch_bar():
    stream = io.StringIO()
    bar = Progress(0, "downloading", unit="B", stream=stream, delay=0)

    bar.total = 2_000_000  # pooch sets the size from Content-Length
    bar.update(1_000_000)
    bar.reset()
    bar.update(2_000_000)
    bar.close()
    bar.close()

    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("downloading: 2.0/2.0 MB (100%)")
    assert len([line for line in lines if "100%" in line]) == 1
