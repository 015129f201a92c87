"""The FastAPI app: the page, ``POST /api/predict``, ``GET /api/model``, ``GET /healthz``.

The model folder is loaded once at start-up. Inference runs in a bounded thread pool so the
event loop keeps serving; Grad-CAM (it back-propagates through the shared network) runs one
at a time. Uploads are checked before any model sees them: size, decodability, pixel count.
"""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio
import pandas as pd
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from lesionlab.cli import check_choices, device_option, model_option, option
from lesionlab.data import CLASS_NAMES, load_rgb
from lesionlab.errors import LesionLabError, collect_warnings, shown_as
from lesionlab.images import image_notes
from lesionlab.labels import default_vocabulary, name_table
from models.folder import ModelFolder
from models.predict import NO_MELANOMA_RULE, Predictor, result_line

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_MB = 20.0
MAX_MB_LIMIT = 1024.0  # uploads are read into memory
MAX_THREADS = 256
UPLOAD_SUFFIX = ".upload"  # images are recognised by content; the client's filename never
                           # reaches the filesystem
DISCLAIMER = ("Research tool, not a medical device: it must not be used to diagnose, treat or "
              "rule out any disease.")


@dataclass
class ServeConfig:
    """What ``python -m serve`` serves and how; its flags come from these fields."""

    model: Path | None = model_option(shipped=True)
    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 serves every network interface")
    port: int = option(8000, "TCP port", ge=1, le=65535)
    device: str = device_option()
    max_mb: float = option(DEFAULT_MAX_MB, "upload size limit in MB", gt=0, le=MAX_MB_LIMIT)
    threads: int = option(2, "inference threads (bounded pool)", ge=1, le=MAX_THREADS)

    def validate(self) -> None:
        """Raise ``LesionLabError`` for a value outside its choices or range.

        Raises:
            LesionLabError: an option outside its choices or range.
        """
        check_choices(self)


def model_summary(model: ModelFolder) -> dict:
    """What the page and ``GET /api/model`` show about the model (from its card and kind):
    its classes (the card's, with full names) and decision rules; without a ``mel`` class
    the melanoma threshold is None and ``melanoma_rule`` says why."""
    card, labels = model.card, model.labels(model.card)
    test, has_mel = card.test, "mel" in card.classes
    return {
        "name": card.name, "kind": card.kind, "folder_kind": model.kind,  # e.g. onnx (export)
        "features": labels.features,
        "head": labels.head, "imbalance": labels.imbalance,
        "uses_metadata": card.metadata, "has_gradcam": model.gradcam_network() is not None,
        "classes": {c: CLASS_NAMES[c] for c in card.classes},
        "decision_rules": {"balanced_accuracy": card.decision_rule,
                           "melanoma_threshold": card.mel_threshold if has_mel else None,
                           **({} if has_mel else {"melanoma_rule": NO_MELANOMA_RULE})},
        "test": {"balanced_accuracy": test["balanced_accuracy"],
                 "ci95": test.get("ci95", {}).get("balanced_accuracy"),
                 "macro_auc": test["macro_auc"], "mel_sensitivity": test["mel_sensitivity"],
                 "n": test["n"], "melanoma_rule": test.get("mel_operating_point")},
        "external": card.external,
        # models.calibrate's second output: its method, val's class frequencies, its test ECEs
        "prevalence_map": None if card.prevalence_map is None else {
            k: v for k, v in card.prevalence_map.items() if k not in ("weight", "bias")},
        # the CLI's vocabulary (lesionlab/vocabulary.csv): every accepted name -> HAM10000's
        "sexes": list(name_table("sex")), "localizations": list(name_table("site")),
        "vocabulary": {"sex": name_table("sex"), "site": name_table("site")},
        "disclaimer": DISCLAIMER,
    }


def check_metadata(age: float | None, sex: str | None, localization: str | None) -> None:
    """422 for metadata values outside the CLI's vocabulary (any case and spacing in).

    Raises:
        HTTPException: 422 for an age outside [0, 120] years or a sex / site name outside the
            vocabulary.
    """
    if age is not None and not 0 <= age <= 120:
        raise HTTPException(422, f"age must be between 0 and 120, got {age:g}")
    vocab = default_vocabulary()
    for what, kind, value in (("sex", "sex", sex), ("localization", "site", localization)):
        if value not in (None, "") and vocab.lookup(kind, value) is None:
            raise HTTPException(422, f"unknown {what} {value!r}; expected one of "
                                     f"{vocab.names(kind)} (any case)")


def canonical(kind: str, value: str | None) -> str | None:
    """A checked form value as HAM10000 names it (``anterior torso`` -> ``trunk``)."""
    return default_vocabulary().lookup(kind, value) if value else None


async def read_upload(image: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes; 413 past ``max_bytes``, 400 when empty.

    Raises:
        HTTPException: 413 past ``max_bytes``, 400 for an empty file.
    """
    data = await image.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"image over the size limit of {max_bytes / 2**20:g} MB")
    if not data:
        raise HTTPException(400, f"empty file {image.filename!r}: no image to predict")
    return data


class Service:
    """The loaded model and what guards it: the thread-pool bound and the Grad-CAM lock."""

    def __init__(self, model_dir: Path | str, device: str, threads: int) -> None:
        self.predictor = Predictor(model_dir, device)
        self.limiter = anyio.CapacityLimiter(threads)
        self.cam_lock = threading.Lock()

    def predict(self, data: bytes, filename: str, meta: pd.DataFrame, gradcam: bool) -> dict:
        """Check the image, predict, and add a Grad-CAM overlay (PNG, base64) when asked.

        Args:
            data: the uploaded file's bytes.
            filename: its name, for the result and messages.
            meta: (1, 3) ``age`` (years), ``sex``, ``localization`` of the image.
            gradcam: add the Grad-CAM overlay.

        Returns:
            :func:`models.predict.result_line`'s record: probabilities of the (n_classes,) card
            classes, decisions, ``gradcam_png`` when asked, and ``warnings`` (one line each)
            for a grey, transparent or palette image and for every other warning the image set
            off (an aspect centre-crop, ...), each once.

        Raises:
            HTTPException: 400 when the bytes are not a readable image (or too small or large).
        """
        with tempfile.NamedTemporaryFile(suffix=UPLOAD_SUFFIX) as tmp, \
                shown_as(tmp.name, repr(filename)), \
                collect_warnings() as raised:  # logged warnings name the upload
            tmp.write(data)
            tmp.flush()
            try:
                load_rgb(tmp.name)
            except LesionLabError as exc:
                msg = str(exc).replace(repr(tmp.name), repr(filename))  # PIL quotes it too
                raise HTTPException(400, msg.replace(tmp.name, repr(filename))) from None
            proba = self.predictor.predict_proba([tmp.name], meta)[0]
            card = self.predictor.card
            mapped = self.predictor.prevalence_proba(proba[None])
            result = result_line(filename, proba, card.mel_threshold, card.classes,
                                 None if mapped is None else mapped[0])
            notes = image_notes(tmp.name, repr(filename))  # grey, transparent, palette
            notes += [m for m in raised if m not in notes]  # e.g. an aspect centre-crop
            if notes:
                result["warnings"] = notes
            if gradcam and self.predictor.cam is not None:
                result["gradcam_png"] = self._gradcam(tmp.name, result["prediction"])
        return result

    def _gradcam(self, path: str, label: str) -> str:
        """The page's overlay: the map of ``label``, the class the page shows (the model's
        prediction, which a single uncalibrated view of the network may not rank first)."""
        from models.explain import explain_one

        buf = io.BytesIO()
        with self.cam_lock:  # an export's torch copy is a folder of its own: loaded once, here
            p = self.predictor.cam.load()
            explain_one(p.network, p.card, p.spec, path, buf, list(p.card.classes).index(label))
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(model_dir: Path | str, device: str = "cpu", max_mb: float = DEFAULT_MAX_MB,
               threads: int = 2) -> FastAPI:
    """The app over one model folder (loaded here: a bad folder fails before serving).

    Raises:
        LesionLabError: ``device``, ``max_mb`` or ``threads`` outside what
            :class:`ServeConfig` allows (``threads`` 0 would queue every request forever),
            or a model folder that does not load.
    """
    ServeConfig(model=Path(model_dir), device=device, max_mb=max_mb, threads=threads).validate()
    service = Service(model_dir, device, threads)
    max_bytes = int(max_mb * 2**20)
    app = FastAPI(title="lesionlab", description=DISCLAIMER)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": service.predictor.card.name}

    @app.get("/api/model")
    def model() -> dict:
        return model_summary(service.predictor.folder)

    @app.post("/api/predict")
    async def predict(image: UploadFile = File(...), age: float | None = Form(None),
                      sex: str | None = Form(None), localization: str | None = Form(None),
                      gradcam: bool = Query(False)) -> dict:
        check_metadata(age, sex, localization)
        data = await read_upload(image, max_bytes)
        meta = pd.DataFrame({"age": [age], "sex": [canonical("sex", sex)],
                             "localization": [canonical("site", localization)]})
        return await anyio.to_thread.run_sync(
            service.predict, data, image.filename or "upload", meta, gradcam,
            limiter=service.limiter)

    app.state.service = service
    return app
