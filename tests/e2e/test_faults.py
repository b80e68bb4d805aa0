"""Nothing lost on faults (DESIGN.md principle 6): while the API server is down,
pods already known keep being identified and keep getting the credentials that
are still valid; when it comes back, new pods are served again."""

from __future__ import annotations

import json
import time

from support.clouds import trust_workload

FLAVOR = {"Metadata-Flavor": "Google"}
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
CREDS = "/latest/meta-data/iam/security-credentials/app"


def imds_credentials(testbed, pod):
    session = testbed.metadata_get(pod, "/latest/api/token", method="PUT",
                                   headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert session.status == 200, session.text
    return testbed.metadata_get(pod, CREDS, headers={"X-aws-ec2-metadata-token": session.text})


def test_api_server_outage_keeps_serving_valid_credentials(testbed, fake_kube, fake_google, fake_aws):
    w = trust_workload(fake_kube, fake_google, fake_aws, "shop", "app")
    pod = testbed.add_pod("app-1", "shop", "app", w.annotations)
    mb = testbed.start_metabridge(*w.metabridge_args)

    before = testbed.metadata_get(pod, TOKEN, headers=FLAVOR)
    assert before.status == 200, before.text
    creds_before = imds_credentials(testbed, pod)
    assert creds_before.status == 200, creds_before.text
    token_requests = len(fake_kube.token_requests)

    fake_kube.set_unavailable(True)
    try:
        time.sleep(1.5)  # the watches notice and start backing off
        for _ in range(5):
            during = testbed.metadata_get(pod, TOKEN, headers=FLAVOR)
            assert during.status == 200, during.text
            assert json.loads(during.text)["access_token"] == json.loads(before.text)["access_token"]
            creds = imds_credentials(testbed, pod)
            assert creds.status == 200, creds.text
            assert json.loads(creds.text)["AccessKeyId"] == json.loads(creds_before.text)["AccessKeyId"]
        assert testbed.whoami(pod).json()["pod"] == "app-1"
        # A pod the index never saw cannot be identified now: a clear, fast
        # "retry" (503), not a hang and not someone else's identity.
        newcomer = testbed.add_pod("app-2", "shop", "app", w.annotations)
        started = time.monotonic()
        refused = testbed.metadata_get(newcomer, TOKEN, headers=FLAVOR)
        assert refused.status == 503, refused.text
        assert time.monotonic() - started < 1.0
        assert mb.proc.poll() is None, "metabridge died during the outage"
    finally:
        fake_kube.set_unavailable(False)

    # Back: the watch resumes and the newcomer is served from the shared cache.
    deadline = time.monotonic() + 15
    while True:
        after = testbed.metadata_get(newcomer, TOKEN, headers=FLAVOR)
        if after.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert after.status == 200, after.text
    assert json.loads(after.text)["access_token"] == json.loads(before.text)["access_token"]
    # The outage cost no extra minting: every credential came from the cache.
    assert len(fake_kube.token_requests) == token_requests
