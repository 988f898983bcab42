import os

import pytest

# Keep the suite predictable on the 2-core CI machine. `make test` runs it in pytest-xdist
# workers (one per core, each taking whole files): each worker gets its share of the cores,
# so that the workers' torch threads do not fight over them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, (os.cpu_count() or 2) // _workers))))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for modules of many small tensors: as fast, and no stalls waiting for
    a second thread when the machine is busy (2 threads made those modules 10x slower under
    load). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic benchmark shared by the tests that only read it."""
    from rmgl.data.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(
        SynthConfig(seed=3, train_ids=30, test_ids=30, distractors=20, junk=10),
        out,
        workers=1,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny synthetic benchmark (Market-1501 layout, about 50 images, 8 training
    identities) that the engine and deploy tests train on and read, generated once per
    session. Read only: a test that changes files copies them first."""
    from deploy_support import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """An rmgl checkpoint of an untrained ResNet-18 RMGL with one K = 2 branch of 32-d
    features (``deploy_support.SMALL_MODEL``: a 192-d descriptor) at 48x16 input, with
    randomised BatchNorm statistics (``deploy_support.make_checkpoint``), written once per
    session."""
    from deploy_support import SMALL_MODEL, make_checkpoint

    path = tmp_path_factory.mktemp("tiny_ck") / "ck.safetensors"
    return make_checkpoint(path, tiny_data, overrides=SMALL_MODEL)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for every test that needs Ray: starting one takes
    seconds."""
    ray = pytest.importorskip("ray")
    for attempt in range(3):
        try:
            ray.init(
                num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False
            )
            break
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception
            # Ray gives its raylet a fixed 30 s to register; on 2 cores shared with another
            # pytest-xdist worker that can run out once. A second start finds warm caches.
            ray.shutdown()
            if "timed out during startup" not in str(error) or attempt == 2:
                raise
    yield ray
    ray.shutdown()
