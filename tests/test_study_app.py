"""The study's HTTP API (Starlette TestClient), its security, the results command and the real evaluate layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from qsched.cli import main
from qsched.errors import QSchedError
from qsched.study.app import create_app
from qsched.study.service import StudyService, StudySettings
from qsched.study.synthetic import write_synthetic_evaluation
from study_helpers import snapshot

ORGANISER = "organiser-secret"


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    return write_synthetic_evaluation(tmp_path_factory.mktemp("eval"), num=6, size=32)


def make_service(eval_dir: Path, cache: Path, **overrides) -> StudyService:
    options = {"gold": 2, "gold_every": 4, "per_annotator": 8, **overrides}
    return StudyService(StudySettings(eval_dir=str(eval_dir), cache_dir=str(cache), **options))


@pytest.fixture
def service(eval_dir: Path, tmp_path: Path) -> StudyService:
    return make_service(eval_dir, tmp_path / "study")


@pytest.fixture
def client(service: StudyService) -> TestClient:
    return TestClient(create_app(service, organiser_token=ORGANISER))


def config_of(service: StudyService, url: str) -> str:
    """Which configuration an image URL shows (the test may know; the page may not)."""
    path = service.image_path(url.removeprefix("img/"))
    return "defect" if path.parent.name == "gold" else path.parent.name


def answer_all(client: TestClient, annotator: str, choose=lambda q: "left") -> list[dict]:
    shown = []
    while True:
        data = client.get("/api/next", params={"annotator": annotator}).json()
        if data["done"]:
            return shown
        assert data["progress"]["answered"] == len(shown)
        question = data["question"]
        response = client.post("/api/vote", json={"annotator": annotator, "question": question["id"],
                                                  "answer": choose(question), "response_ms": 1234})
        assert response.status_code == 200 and response.json() == {"ok": True, "duplicate": False, "answer": response.json()["answer"]}
        shown.append(question)


def test_an_annotator_answers_their_share_and_each_vote_records_what_was_shown(client, service) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "nosniff" in page.headers["x-content-type-options"]
    shown = answer_all(client, "alice")
    assert len(shown) == 8 and len({q["id"] for q in shown}) == 8  # never the same question twice
    assert [q["id"][0] for q in shown].count("g") == 2  # gold at positions 2 and 6
    votes = service.store.all_votes()
    assert [v.question for v in votes] == [q["id"] for q in shown]
    for vote, question in zip(votes, shown):
        assert (vote.left, vote.right) == (config_of(service, question["left"]), config_of(service, question["right"]))
        assert vote.answer == "left" and vote.winner == vote.left and vote.response_ms == 1234 and vote.annotator == "alice"
        assert question["prompt"] == service.source.prompts[vote.index]
        assert vote.gold == question["id"].startswith("g") and (vote.correct is None) == (not vote.gold)
    image = client.get("/" + shown[0]["left"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert "fp" not in shown[0]["left"] and "w4a8" not in json.dumps(shown)  # configuration names stay hidden
    assert client.get("/api/next", params={"annotator": "alice"}).json() == {"done": True, "progress": {"answered": 8, "target": 8}}


def test_a_double_click_or_retry_records_one_vote_and_the_first_answer_stands(client, service) -> None:
    question = client.get("/api/next", params={"annotator": "bob"}).json()["question"]
    body = {"annotator": "bob", "question": question["id"], "answer": "right", "response_ms": 10}
    first, again = client.post("/api/vote", json=body), client.post("/api/vote", json=body)
    changed = client.post("/api/vote", json={**body, "answer": "tie"})
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True and changed.json()["duplicate"] is True
    assert changed.json()["answer"] == "right"
    assert [(v.question, v.answer) for v in service.store.all_votes()] == [(question["id"], "right")]
    assert client.get("/api/next", params={"annotator": "bob"}).json()["question"]["id"] != question["id"]


def test_bad_input_is_a_4xx_and_stores_nothing(client, service) -> None:
    question = client.get("/api/next", params={"annotator": "carol"}).json()["question"]["id"]
    good = {"annotator": "carol", "question": question, "answer": "left", "response_ms": 5}
    cases = [
        ({**good, "question": "q99-0"}, 404), ({**good, "question": "../evaluation.json"}, 404), ({**good, "question": 3}, 404),
        ({**good, "answer": "both"}, 422), ({**good, "answer": None}, 422), ({**good, "annotator": "a b"}, 422),
        ({**good, "annotator": "x" * 65}, 422), ({**good, "response_ms": -1}, 422), ({**good, "response_ms": "9"}, 422),
        ({**good, "extra": 1}, 422), ([good], 400),
    ]
    for body, status in cases:
        response = client.post("/api/vote", json=body)
        assert response.status_code == status, (body, response.text)
        assert "error" in response.json()
    assert client.post("/api/vote", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/api/vote", content=json.dumps(good), headers={"content-type": "text/plain"}).status_code == 415
    huge = json.dumps({**good, "annotator": "a" * 10_000})
    assert client.post("/api/vote", content=huge, headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/api/vote").status_code == 405
    assert client.get("/api/next", params={"annotator": ""}).status_code == 422
    assert client.get("/api/next", params={"annotator": "<script>"}).status_code == 422
    assert service.store.count() == 0


def test_only_the_studys_images_are_served(client, eval_dir) -> None:
    for path in ["/img/0000", "/img/..%2Fevaluation.json", "/img/" + "0" * 32, "/img/../evaluation.json",
                 "/images/fp/00000.png", "/evaluation.json", "/static/../app.py"]:
        assert client.get(path).status_code == 404, path


def test_tokens_guard_the_annotators_api_and_the_organisers_pages(service) -> None:
    client = TestClient(create_app(service, annotator_token="tok", organiser_token=ORGANISER))
    assert client.get("/api/next", params={"annotator": "dan"}).status_code == 401
    assert client.get("/api/next", params={"annotator": "dan", "t": "wrong"}).status_code == 401
    question = client.get("/api/next", params={"annotator": "dan", "t": "tok"}).json()["question"]
    body = {"annotator": "dan", "question": question["id"], "answer": "tie"}
    assert client.post("/api/vote", json=body).status_code == 401
    assert client.post("/api/vote", json=body, headers={"X-Study-Token": "tok"}).status_code == 200
    assert client.get("/api/results").status_code == 401 and client.get("/results").status_code == 401
    assert client.get("/api/results", headers={"Authorization": "Bearer nope"}).status_code == 401
    results = client.get("/api/results", headers={"Authorization": f"Bearer {ORGANISER}"})
    assert results.status_code == 200 and results.json()["votes"] == 1
    page = client.get("/results", params={"token": ORGANISER})
    assert page.status_code == 200 and "Study results" in page.text and "dan" in page.text


def test_the_page_is_keyboard_and_screen_reader_ready(client) -> None:
    page = client.get("/").text
    for word, key in (("left", "ArrowLeft"), ("right", "ArrowRight"), ("tie", "ArrowDown")):
        assert f'aria-label="{word}' in page and f'aria-keyshortcuts="{key}"' in page
    assert 'name="viewport"' in page and "static/study.js" in page
    assert client.get("/static/study.js").headers["content-type"].startswith("text/javascript")
    assert "default-src 'self'" in client.get("/").headers["content-security-policy"]


def test_gold_images_go_to_the_cache_and_the_evaluation_is_never_touched(eval_dir, tmp_path) -> None:
    before = snapshot(eval_dir)
    service = make_service(eval_dir, tmp_path / "cache")
    client = TestClient(create_app(service, organiser_token=ORGANISER))
    answer_all(client, "erin")
    assert snapshot(eval_dir) == before
    gold = sorted((tmp_path / "cache" / "gold").glob("*.png"))
    assert [p.name for p in gold] == ["g0.png", "g1.png"]
    for path, question in zip(gold, service.design.golds):
        original = np.asarray(Image.open(service.source.image(question.a, question.index).path).convert("RGB"), dtype=float)
        defect = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        assert defect.shape == original.shape and np.abs(defect - original).mean() > 30  # visibly different
    assert (tmp_path / "cache" / "votes.db").is_file()


def test_a_store_is_bound_to_one_study(eval_dir, tmp_path) -> None:
    make_service(eval_dir, tmp_path / "s")
    with pytest.raises(QSchedError, match="holds another study .differs in: pairs"):
        make_service(eval_dir, tmp_path / "s", pairs="fp:w4a8")
    assert make_service(eval_dir, tmp_path / "s").secret == make_service(eval_dir, tmp_path / "s").secret


def test_results_command_writes_every_output(eval_dir, tmp_path, capsys) -> None:
    service = make_service(eval_dir, tmp_path / "study")
    client = TestClient(create_app(service, organiser_token=ORGANISER))
    # three annotators prefer the less noisy configuration (fp < w4a8 < w4a4), one answers the gold wrong
    order = {"fp": 0, "w4a8": 1, "w4a4": 2, "defect": 3}

    def prefer_clean(question):
        left, right = config_of(service, question["left"]), config_of(service, question["right"])
        return "left" if order[left] < order[right] else "right"

    for name in ("u1", "u2", "u3"):
        answer_all(client, name, prefer_clean)
    answer_all(client, "careless", lambda q: "tie")
    out = tmp_path / "results"
    code = main(["study", "results", str(eval_dir), "--cache", str(tmp_path / "study"), "--out", str(out), "--bootstrap", "50"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["votes"] == 3 * 6 and results["votes_total"] == 4 * 8 and results["flagged_annotators"] == 1
    assert results["gold_accuracy"] == pytest.approx(6 / 8)
    fp_w4a8 = next(p for p in results["pairs"] if (p["a"], p["b"]) == ("fp", "w4a8"))
    assert fp_w4a8["loss"] == 0 and fp_w4a8["win"] == fp_w4a8["n"] > 0
    strengths = results["bradley_terry"]["items"]
    assert strengths["fp"]["strength"] > strengths["w4a8"]["strength"] > strengths["w4a4"]["strength"]
    assert "| careless | 8 | 0/2 | 0.0% |" in (out / "results.md").read_text()
    assert len((out / "votes.csv").read_text().strip().splitlines()) == 1 + 32
    assert Image.open(out / "results.png").size[0] > 500


def test_cli_errors_are_one_line_exit_2(eval_dir, tmp_path, capsys) -> None:
    cases = [
        (["study", "results", str(eval_dir), "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "no votes at"),
        (["study", "serve", str(tmp_path / "missing"), "--port", "0"], "has no evaluation.json"),
        (["study", "serve", str(eval_dir), "--pairs", "fp:w9", "--cache", str(tmp_path / "c"), "--port", "0"], "unknown configuration 'w9'"),
        (["study", "simulate", str(eval_dir), "--judge", "nonsense", "--votes", "3"], "unknown judge 'nonsense'"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_real_evaluate_folder(tiny_pipeline_path, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shoe\na red bag\na coat\n")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_pipeline_path("lcm")), "--prompts", str(prompts), "--configs", "fp,w8a8",
                 "--metrics", "mse", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    service = make_service(out, tmp_path / "study", gold=1, gold_every=2)
    assert service.source.configs == ("fp", "w8a8") and service.source.prompts == ("a shoe", "a red bag", "a coat")
    client = TestClient(create_app(service, organiser_token=ORGANISER))
    shown = answer_all(client, "frank")
    assert len(shown) == 4 and {q["prompt"] for q in shown} == {"a shoe", "a red bag", "a coat"}
    real = next(q for q in shown if not q["id"].startswith("g"))
    assert Image.open(service.image_path(real["left"].removeprefix("img/"))).size == (32, 32)
