"""Shared fixtures: the simulated node, the fake cluster and clouds, metabridge.

Fixtures (all function-scoped, all torn down even when the test fails):

- ``netns_env`` (session): checks that this machine can build nodes (root,
  ``ip netns``, iptables) and sweeps leftovers of crashed runs. When it cannot:
  skip locally, **fail** when ``CI=true``.
- ``node``: a `support.netns.Node`; after the test nothing of it may remain.
- ``fake_kube``: a started `FakeKube` that knows the node object.
- ``testbed``: `support.testbed.Testbed` (FakeKube + node + metabridge factory);
  ``testbed.add_pod(name, namespace, sa, annotations)``.
- ``metabridge``: factory ``metabridge(*extra_args, wait=True)`` → a started
  (and by default ready) `Metabridge` on the testbed's node.
- ``daemon_logs``: list to append hand-made `Metabridge`s to (logs on failure).
- ``fake_google`` / ``fake_aws``: started cloud fakes (pods reach them at
  ``fake.url_for(node.host_ip)``, metabridge at ``fake.url``).

When a test fails, the log of every metabridge it started is attached to the
report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import netns  # noqa: E402
from support.testbed import Testbed  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
_DAEMONS = pytest.StashKey[list]()


def skip_or_fail(reason: str) -> None:
    """Skip locally; in CI an end-to-end test that cannot run is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true and the end-to-end environment is missing: {reason}",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def netns_env():
    try:
        netns.check_environment()
    except netns.TestbedError as e:
        skip_or_fail(str(e))
    removed = netns.cleanup_stale()
    if removed:
        sys.stderr.write(f"\nremoved leftovers of earlier runs: {', '.join(removed)}\n")
    return True


@pytest.fixture
def node(netns_env):
    n = netns.Node()
    yield n
    n.close()
    left = n.leftovers()
    assert not left, f"node teardown left {left}"


@pytest.fixture
def fake_kube(node):
    from support.fake_kube import FakeKube

    kube = FakeKube()
    kube.start()
    try:
        kube.add_node(node.name, addresses=[node.host_ip])
        yield kube
    finally:
        kube.stop()


@pytest.fixture
def testbed(request, fake_kube, node, tmp_path):
    tb = Testbed(fake_kube, node, tmp_path / "testbed", daemons=request.node.stash[_DAEMONS])
    yield tb
    tb.close()


@pytest.fixture
def daemon_logs(request):
    """Append a Metabridge made by hand here to have its log shown on failure."""
    return request.node.stash[_DAEMONS]


@pytest.fixture
def metabridge(testbed):
    def start(*extra_args: str, wait: bool = True, **kw):
        return testbed.start_metabridge(*extra_args, wait=wait, **kw)

    return start


@pytest.fixture
def fake_google():
    from support.fake_google import FakeGoogle

    fake = FakeGoogle().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_aws():
    from support.fake_aws import FakeAwsSts

    fake = FakeAwsSts().start()
    yield fake
    fake.stop()


# -- logs of the daemons on failure -------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_DAEMONS] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("call", "setup", "teardown"):
        for mb in item.stash.get(_DAEMONS, []):
            text = mb.log_text()
            if len(text) > 40_000:
                text = "[... cut ...]\n" + text[-40_000:]
            report.sections.append((f"{mb.name} log ({mb.log_path})", text))
