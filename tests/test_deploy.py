"""Deployment artefacts: the Bento serves the model it carries; the Kubernetes
manifests and the BentoCloud config are valid against their real schemas."""

from __future__ import annotations

import copy
import functools
import http.client
import subprocess
import sys
import time
from concurrent.futures import Future

import cattrs
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from conftest import CAN_BUILD_IMAGES, ROOT, BuiltImage
from sqlalchemy import make_url

from chatbot.settings import Settings
from devtools.processes import LOCAL, free_port, service_info, stop_tree, wait_until_healthy

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.34"


def manifests() -> dict[str, dict]:
    return {
        path.name: yaml.safe_load(path.read_text())
        for path in sorted(KUBERNETES.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def by_kind(kind: str) -> dict[str, dict]:
    return {name: doc for name, doc in manifests().items() if doc["kind"] == kind}


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_is_valid_kubernetes(name):
    kubernetes_validate.validate(manifests()[name], KUBERNETES_VERSION, strict=True)


def test_validation_catches_mistakes():
    broken = copy.deepcopy(manifests()["service-deployment.yaml"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(manifests())


def test_service_deployment_probes_metrics_and_resources():
    pod = by_kind("Deployment")["service-deployment.yaml"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert container["resources"]["requests"]["memory"]


def test_ui_points_at_the_service_and_the_hpa_at_the_deployment():
    ui = by_kind("Deployment")["ui-deployment.yaml"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in ui["containers"][0]["env"]}
    service = by_kind("Service")["service-service.yaml"]
    assert env["CHATBOT_URL"] == (
        f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )
    (hpa,) = by_kind("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "chatbot-service"


def test_service_and_page_take_the_same_optional_api_key_secret():
    refs = [
        env["valueFrom"]["secretKeyRef"]
        for deployment in by_kind("Deployment").values()
        for env in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if env["name"] == "CHATBOT_API_KEY"
    ]
    assert len(refs) == 2
    assert refs[0] == refs[1]
    assert refs[0]["optional"] is True


# --- scaling and disruptions ------------------------------------------------------------

KEDA = KUBERNETES / "keda"


def service_pod() -> dict:
    return by_kind("Deployment")["service-deployment.yaml"]["spec"]["template"]


def service_env() -> dict[str, str]:
    (container,) = service_pod()["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def scaled_object() -> dict:
    return yaml.safe_load((KEDA / "scaledobject.yaml").read_text())


def test_the_scaled_object_matches_kedas_api():
    """KEDA's ScaledObject (v1alpha1), as its CRDs define it: every key known."""
    document = scaled_object()
    parsed = ScaledObject.model_validate(document)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == document
    misspelt = copy.deepcopy(document)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    assert (
        ScaledObject.model_validate(misspelt).model_dump(
            by_alias=True, exclude_unset=True, mode="json"
        )
        != misspelt
    )


def test_keda_scales_the_service_on_its_queue_at_the_measured_concurrency():
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["name"] == "chatbot-service"
    (trigger,) = spec["triggers"]
    query = trigger["metadata"]["query"]
    assert "chatbot_num_requests_running" in query
    assert "chatbot_num_requests_waiting" in query
    threshold = int(trigger["metadata"]["threshold"])
    assert threshold == int(service_env()["CHATBOT_TARGET_CONCURRENCY"])
    assert threshold == Settings.from_env().target_concurrency  # the service's default
    kustomization = yaml.safe_load((KEDA / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "scaledobject.yaml"]
    (deleted,) = [yaml.safe_load(p["patch"]) for p in kustomization["patches"]]
    (hpa,) = by_kind("HorizontalPodAutoscaler").values()  # the CPU fallback it replaces
    assert (deleted["kind"], deleted["metadata"]) == (hpa["kind"], hpa["metadata"])


def test_restarts_and_drains_never_take_the_last_ready_replica():
    deployment = by_kind("Deployment")["service-deployment.yaml"]["spec"]
    budget = by_kind("PodDisruptionBudget")["service-pdb.yaml"]
    assert budget["spec"]["selector"] == deployment["selector"]
    least = min(
        deployment["replicas"],
        scaled_object()["spec"]["minReplicaCount"],
        next(iter(by_kind("HorizontalPodAutoscaler").values()))["spec"]["minReplicas"],
    )
    assert budget["spec"]["minAvailable"] < least
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_a_stopping_replica_has_time_to_finish_every_reply():
    pod = service_pod()["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    longest_reply = float(service_env()["CHATBOT_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + longest_reply


def bentocloud_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())


def as_deployment(config: dict) -> CreateDeploymentSchema:
    """BentoML's own deployment schema, refusing keys it does not know."""
    return cattrs.Converter(forbid_extra_keys=True).structure(config, CreateDeploymentSchema)


def test_bentocloud_config_matches_bentomls_schema():
    chatbot = as_deployment(bentocloud_config()).services["Chatbot"]
    assert (chatbot.scaling.min_replicas, chatbot.scaling.max_replicas) == (2, 8)
    traffic = chatbot.config_overrides["traffic"]
    concurrency = Settings.from_env().target_concurrency
    assert traffic == {"concurrency": concurrency, "external_queue": True}
    misspelt = bentocloud_config()
    misspelt["services"]["Chatbot"]["scalling"] = {"min_replicas": 1}
    with pytest.raises(cattrs.ClassValidationError):
        as_deployment(misspelt)


@pytest.mark.parametrize("bentofile", ["deploy/bentofile.local-image.yaml", "bentofile.cuda.yaml"])
def test_every_bentofile_packs_the_sources_the_default_one_does(bentofile: str):
    def included(path: str) -> list[str]:
        return yaml.safe_load((ROOT / path).read_text())["include"]

    assert included(bentofile) == included("bentofile.yaml")


KEEP_ALIVE = {"CHATBOT_KEEP_ALIVE_S": "3"}  # short, to watch the server close


def assert_serves(port: int, process: subprocess.Popen[bytes]) -> None:
    """The server on ``port`` answers a chat, on the engine's own C kernels (the sources
    and a compiler came along: without them it still answers, on torch's slower calls),
    and closes idle connections when the environment it runs in says."""
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(f"{url}/readyz", process)
    reply = LOCAL.post(f"{url}/chat", json={"user_input": "hi"}, timeout=60)
    assert reply.status_code == 200
    assert isinstance(reply.json(), str)
    assert service_info(url)["attention"] == "rows"
    assert_idle_connections_close_after(port, float(KEEP_ALIVE["CHATBOT_KEEP_ALIVE_S"]))


def assert_idle_connections_close_after(port: int, keep_alive_s: float) -> None:
    """The server keeps an idle connection ``keep_alive_s``, then closes it: the
    setting reached the server from the environment the Bento or image runs in."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for idle_s in (0, keep_alive_s / 3):
        time.sleep(idle_s)
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    assert connection.sock is not None
    time.sleep(keep_alive_s + 1)
    assert connection.sock.recv(1) == b""  # closed by the server
    connection.close()


@pytest.mark.build
@pytest.mark.last  # its build ran in the background meanwhile (conftest.bento_build)
def test_the_built_bento_serves_the_model_it_carries(
    bento_build: Future[tuple[dict[str, str], str]], tmp_path
):
    env, bento = bento_build.result()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", bento,
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env={**env, **KEEP_ALIVE}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert_serves(port, server)
    finally:
        stop_tree(server)


@pytest.mark.build
@pytest.mark.last  # its build ran in the background meanwhile (conftest.image_build)
@pytest.mark.skipif(
    not CAN_BUILD_IMAGES,
    reason="building an image without Docker needs root, buildah and mmdebstrap",
)
def test_the_image_built_from_the_bento_answers_a_chat(image_build: Future[BuiltImage]):
    """``make image`` without Docker: buildah builds, ``buildah run`` starts it."""
    image = image_build.result()
    buildah = functools.partial(
        subprocess.run, env=image.env, capture_output=True, text=True, timeout=300
    )
    container = buildah(["buildah", "from", image.name]).stdout.strip()
    port = free_port()
    # No step compiled, as for every server of the suite (conftest.offline_env).
    settings = {**KEEP_ALIVE, "CHATBOT_COMPILE_STEP": "false"}
    server = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", "--network", "host",
         "--user", "bentoml", *(f"--env={k}={v}" for k, v in settings.items()), container, "--",
         "/home/bentoml/bento/env/docker/entrypoint.sh",
         "--host", "127.0.0.1", "--port", str(port)],
        env=image.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert_serves(port, server)
    finally:
        stop_tree(server)
        buildah(["buildah", "rm", container])  # the image stays: the next build's layers


def test_the_page_reads_optional_sign_in_settings_from_a_secret():
    ui = by_kind("Deployment")["ui-deployment.yaml"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in ui["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in ui["volumes"]}
    # Streamlit reads .streamlit/secrets.toml from its working directory, /app in the image.
    workdir = next(
        line.split()[1]
        for line in (ROOT / "frontend" / "Dockerfile").read_text().splitlines()
        if line.startswith("WORKDIR")
    )
    assert mounts["auth"]["mountPath"] == f"{workdir}/.streamlit"
    assert volumes["auth"]["secret"] == {"secretName": "chatbot-ui-auth", "optional": True}


# --- the page's replicas and its database ---------------------------------------------------

WITH_POSTGRES = KUBERNETES / "with-postgres"


def page() -> dict:
    return by_kind("Deployment")["ui-deployment.yaml"]


def try_out_documents() -> list[dict]:
    return list(yaml.safe_load_all((WITH_POSTGRES / "postgres.yaml").read_text()))


def test_the_page_runs_replicas_with_no_volume_of_its_own_and_updates_rolling():
    spec = page()["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    assert all("persistentVolumeClaim" not in volume for volume in pod["volumes"])
    assert by_kind("PersistentVolumeClaim") == {}
    budget = by_kind("PodDisruptionBudget")["ui-pdb.yaml"]
    assert budget["spec"]["selector"] == spec["selector"]
    assert budget["spec"]["minAvailable"] < spec["replicas"]


def test_a_browser_stays_on_one_page_replica():
    """Streamlit keeps a tab's session, and sign-in's state, in one process."""
    service = by_kind("Service")["ui-service.yaml"]["spec"]
    assert service["sessionAffinity"] == "ClientIP"
    assert service["selector"] == page()["spec"]["selector"]["matchLabels"]


def test_the_page_takes_its_database_from_the_secret_the_try_out_overlay_makes():
    (container,) = page()["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["CHATBOT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert "optional" not in ref  # no database, no page: never a silent SQLite per pod
    assert "CHATBOT_DATA_DIR" not in env

    kustomization = yaml.safe_load((WITH_POSTGRES / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "postgres.yaml"]
    secrets = {
        generator["name"]: dict(literal.split("=", 1) for literal in generator["literals"])
        for generator in kustomization["secretGenerator"]
    }
    url = make_url(secrets[ref["name"]][ref["key"]])
    service, statefulset = try_out_documents()
    (database,) = statefulset["spec"]["template"]["spec"]["containers"]
    database_env = {e["name"]: e for e in database["env"]}
    password = database_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert url.drivername == "postgresql+psycopg"  # the driver frontend/requirements.txt has
    assert (url.host, url.port) == (
        service["metadata"]["name"],
        service["spec"]["ports"][0]["port"],
    )
    assert url.username == database_env["POSTGRES_USER"]["value"]
    assert url.database == database_env["POSTGRES_DB"]["value"]
    assert url.password == secrets[password["name"]][password["key"]]


@pytest.mark.parametrize("index", [0, 1])
def test_the_try_out_database_is_valid_kubernetes(index):
    kubernetes_validate.validate(try_out_documents()[index], KUBERNETES_VERSION, strict=True)
