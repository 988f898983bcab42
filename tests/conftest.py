import os

import pytest

# Keep the suite predictable on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic benchmark shared by the tests that only read it."""
    from rmgl.data.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(seed=3, train_ids=30, test_ids=30, distractors=20, junk=10), out, workers=1, progress=False)
    return out
