"""Reading uploads, the domain check, Grad-CAM and the batch table on real slices and on every kind of bad
upload; the app served with the bundled model and called over HTTP and in a browser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from conftest import CLASSES, REPO, real_images
from hf_tumor.serving.domain import image_checks
from hf_tumor.serving.explain import CamExplainer, overlay
from hf_tumor.serving.image_io import InputError, read_image
from hf_tumor.serving.inference import load_predictor
from hf_tumor.serving.inference import BUNDLED_MODEL
from hf_tumor.serving.reporting import OutputFolder, batch_table, verdict
from hf_tumor.serving.scan import MAX_SCAN_BYTES
from hostile_files import BAD, GOOD, build_all

# what the bundled model answers for each readable kind of file: every one is the first meningioma test
# slice, converted, except the DICOM, which is written from the first glioma test slice
EXPECTED = {kind: "meningioma" for kind in GOOD} | {"dicom": "glioma"}


@pytest.mark.parametrize("kind", GOOD)
def test_readable_formats_become_rgb_or_gray(kind, tmp_path, slice_image):
    image = read_image(GOOD[kind](tmp_path, slice_image))
    # single-channel sources stay grayscale (the transform repeats the channel), all else becomes RGB
    assert image.mode == ("L" if kind in ("grayscale jpeg", "16-bit png", "dicom") else "RGB")
    assert min(image.size) >= 32
    assert np.asarray(image).std() > 5  # real content, not a blank conversion


@pytest.mark.parametrize("kind", BAD)
def test_bad_uploads_get_clear_messages(kind, tmp_path):
    make, expected = BAD[kind]
    path = make(tmp_path, None)
    assert path.stat().st_size < 50_000 or kind == "too large"  # the bomb is a few KB on disk
    with pytest.raises(InputError, match=expected):
        read_image(path)


def test_exif_rotation_is_applied(tmp_path, slice_image):
    assert read_image(GOOD["exif-rotated jpeg"](tmp_path, slice_image)).size == (200, 300)


def test_a_decompression_bomb_is_refused_without_decoding_it(tmp_path):
    """Reading the 20,000 x 20,000 PNG (400 MB of pixels once decoded) keeps the process small."""
    bomb = BAD["bomb"][0](tmp_path, None)
    # VmHWM: this process's peak resident memory (getrusage's maxrss would include the parent's, across exec)
    code = ("import sys; from hf_tumor.serving.image_io import InputError, read_image\n"
            "try: read_image(sys.argv[1])\nexcept InputError as e: print(e)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    message, peak_kb = out.stdout.strip().splitlines()
    assert "pixels" in message and int(peak_kb) < 300_000


def test_image_checks_flag_non_mri_images(slice_image):
    from sklearn.datasets import load_sample_image

    assert image_checks(slice_image) == []
    assert any("colour" in r for r in image_checks(PIL.Image.fromarray(load_sample_image("china.jpg"))))
    assert any("blank" in r for r in image_checks(PIL.Image.new("RGB", (200, 200), (240, 240, 240))))
    page = PIL.Image.new("L", (400, 500), 255)
    from PIL import ImageDraw
    ImageDraw.Draw(page).text((20, 20), "Patient report\n" * 20, fill=0)
    assert any("document" in r for r in image_checks(page))
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
    assert any("noise" in r for r in image_checks(noise))


@pytest.mark.slow
def test_predictions_cam_and_batch_table(trained_model, slice_image, tmp_path):
    predictor = load_predictor(trained_model)
    prediction = predictor.predict([slice_image.convert("RGB")])[0]
    assert list(prediction.probabilities) == CLASSES
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-5
    cam = CamExplainer(trained_model).heatmap(predictor.preprocess([slice_image]), CLASSES.index(prediction.label))
    assert cam.shape == (64, 64) and 0 <= cam.min() and cam.max() <= 1
    blended = overlay(slice_image.convert("RGB"), cam, opacity=0.5)
    shown = slice_image.copy()
    shown.thumbnail((512, 512))
    assert blended.shape == (shown.height, shown.width, 3) and blended.dtype == np.uint8
    assert not np.array_equal(blended, overlay(slice_image.convert("RGB"), cam, opacity=0.0))
    (tmp_path / "junk.jpg").write_text("junk")
    header, rows, text = batch_table(predictor.predict_files([real_images("Testing", "glioma", 1)[0], tmp_path / "junk.jpg"]),
                                     predictor.class_names)
    assert rows[0][0] == real_images("Testing", "glioma", 1)[0].name and "not an image" in rows[1][-1]
    assert rows[0][1] == ("" if rows[0][-1] else max(CLASSES, key=lambda c: rows[0][2 + CLASSES.index(c)]))
    assert text.splitlines()[0] == ",".join(header) == ",".join(["file", "label", *CLASSES, "note"])


def test_the_verdict_names_the_label_or_the_flags():
    from hf_tumor.serving.inference import Prediction

    sure = Prediction(label="glioma", probabilities={"glioma": 0.9, "notumor": 0.1})
    assert verdict(sure) == "Predicted: **glioma** (90.0%)."
    flagged = Prediction(label="glioma", probabilities={"glioma": 0.9, "notumor": 0.1}, flags=["it is blank"])
    assert "it is blank" in verdict(flagged) and "glioma" not in verdict(flagged)


def test_output_folder_sweeps_old_files_and_is_removed_on_close():
    """The app's downloads (batch CSVs name the uploaded files) do not outlive their use."""
    outputs = OutputFolder(max_age_s=60)
    old = outputs.write("predictions.csv", "file,label\nsecret-patient.jpg,glioma\n")
    assert old.read_text().startswith("file,label") and old.parent.parent == outputs.path
    os.utime(old, (0, 0))  # made long ago
    fresh = outputs.write("predictions.csv", "file,label\n")  # writing sweeps what is older than max_age_s
    assert not old.exists() and not old.parent.exists() and fresh.is_file() and fresh != old
    assert outputs.sweep() == 0
    outputs.close()
    assert not outputs.path.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """The Space's UI, built by space/app.py for the bundled model, served in-process on 127.0.0.1, with
    two real test slices as its examples."""
    examples = tmp_path_factory.mktemp("examples")
    for name in ("pituitary", "glioma"):
        (examples / f"{name}.jpg").symlink_to(real_images("Testing", name, 1)[0])
    os.environ["HF_TUMOR_EXAMPLES"] = str(examples)
    sys.path.insert(0, str(REPO / "space"))
    from app import build_demo

    demo = build_demo(load_predictor(BUNDLED_MODEL), CamExplainer(BUNDLED_MODEL))
    demo.queue(max_size=8, default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=MAX_SCAN_BYTES)  # as space/app.py does
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    os.environ.pop("HF_TUMOR_EXAMPLES")


@pytest.mark.slow
def test_app_over_http(served_app, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served_app, verbose=False)
    slice_file = handle_file(str(real_images("Testing", "pituitary", 1)[0]))
    label, message = client.predict(slice_file, api_name="/classify")
    assert message.startswith("Predicted: **pituitary**") and label["label"] == "pituitary"
    heatmap = client.predict(slice_file, 0.45, api_name="/explain")  # the map comes second, on its own
    assert np.asarray(PIL.Image.open(heatmap)).shape[2] == 3
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(bad)), api_name="/classify")
    # still serving after the bad request; the batch endpoint reports bad files in its table
    rows, _csv = client.predict([handle_file(str(real_images("Testing", "glioma", 1)[0])), handle_file(str(bad))],
                                api_name="/classify_batch")
    assert len(rows["data"]) == 2 and rows["data"][0][1] == "glioma" and "not an image" in rows["data"][1][-1]


@pytest.fixture(scope="module")
def api_client(served_app):
    from gradio_client import Client

    return Client(served_app, verbose=False)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, slice_image) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("hostile"), slice_image)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*GOOD, *BAD])
def test_every_kind_of_file_through_the_http_api(kind, api_client, hostile):
    from gradio_client import handle_file

    if kind == "dicom":  # a display image stored as DICOM: the API must answer exactly as the library does
        from hf_tumor.serving.inference import load_predictor
        from hf_tumor.serving.reporting import verdict

        expected = verdict(load_predictor(BUNDLED_MODEL, backend="onnx-int8").predict_files([hostile[kind]])[0])
        _label, message = api_client.predict(handle_file(str(hostile[kind])), api_name="/classify")
        assert message.split(" (")[0] == expected.split(" (")[0], message
    elif kind in GOOD:
        _label, message = api_client.predict(handle_file(str(hostile[kind])), api_name="/classify")
        assert message.startswith(f"Predicted: **{EXPECTED[kind]}**"), message
    else:
        with pytest.raises(Exception, match=BAD[kind][1]):
            api_client.predict(handle_file(str(hostile[kind])), api_name="/classify")


@pytest.mark.slow
def test_still_serving_after_the_hostile_files(api_client):
    from gradio_client import handle_file

    _label, message = api_client.predict(
        handle_file(str(real_images("Testing", "glioma", 1)[0])), api_name="/classify")
    assert message.startswith("Predicted: **glioma**")


@pytest.fixture(scope="module")
def mni_path() -> Path:
    pytest.importorskip("nilearn")
    from hf_tumor.checks.external import SOURCES

    return SOURCES["mni152"].path()


def gradio_uploads() -> Path:
    """Where Gradio keeps uploads (GRADIO_TEMP_DIR, else a folder in the system's temporary directory)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


@pytest.mark.slow
def test_whole_scan_over_http(api_client, mni_path, tmp_path):
    """A real 1 mm head through the Whole scan endpoints: read (and the upload deleted at once), classified
    slice by slice, one slice shown with its answer; a scan the app cannot take gets a message."""
    import csv
    from gradio_client import handle_file

    upload = tmp_path / f"head-{uuid.uuid4().hex[:8]}.nii.gz"
    shutil.copy(mni_path, upload)
    cleared, text = api_client.predict([handle_file(str(upload))], api_name="/read_scan")
    assert text.startswith(f"Read **{upload.name}**: 197 x 233 x 189 voxels of 1 x 1 x 1 mm")
    assert cleared is None and not list(gradio_uploads().rglob(upload.name))  # the server kept no copy
    summary, curve, slider, csv_file = api_client.predict("axial", api_name="/classify_scan")
    assert "axial slices through the head" in summary and "- notumor: " in summary
    rows = list(csv.DictReader(open(csv_file)))
    assert len(rows) == int(summary.split(": ")[1].split()[0]) and rows[0]["plane"] == "axial"
    assert slider["minimum"] == int(rows[0]["index"]) and slider["maximum"] == int(rows[-1]["index"])
    assert len(curve["data"]) == 4 * len(rows)
    image, answer = api_client.predict(slider["value"], 0.45, api_name="/show_slice")
    assert answer.startswith(f"Slice {slider['value']} (level ") and "Predicted: **notumor**" in answer
    assert np.asarray(PIL.Image.open(image)).shape[2] == 3  # the slice with its heatmap

    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as archive:  # two series: the app asks for one
        for n, uid in enumerate(("1.2.3.1", "1.2.3.2")):
            for k in range(2):
                archive.writestr(f"s{n}/im{k}.dcm", _tiny_dicom(uid, k))
    with pytest.raises(Exception, match="2 DICOM series found.*one DICOM series per upload"):
        api_client.predict([handle_file(str(two))], api_name="/read_scan")
    with pytest.raises(Exception, match="Upload a scan first"):  # the new session holds no scan
        type(api_client)(api_client.src, verbose=False).predict("axial", api_name="/classify_scan")


def _tiny_dicom(series_uid: str, k: int) -> bytes:
    """A 32 x 32 MR image of a series, at slice position k (for the app's multi-series message)."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SeriesInstanceUID, ds.Modality = meta, MRImageStorage, series_uid, "MR"
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, float(k)], [1, 0, 0, 0, 1, 0], [1, 1]
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(32 * 32, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
def test_browser_example_preview_label_and_heatmap(served_app):
    """A real browser (Debian's chromium driven by Playwright) clicks an example: the slice is shown at
    once, Classify gives the label, the heatmap follows; then an upload of its own file does the same."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1200})
        page.goto(served_app, wait_until="load")
        classify = page.get_by_role("button", name="Classify", exact=True)
        classify.wait_for(timeout=60_000)
        # images the app serves: the preview of the chosen slice first, then the heatmap
        served = page.locator("img[src*='/file=']")

        def wait_for_images(n: int) -> None:
            page.wait_for_function(f"document.querySelectorAll(\"img[src*='/file=']\").length >= {n}", timeout=60_000)

        assert served.count() == 0  # nothing shown before anything is chosen
        page.get_by_text("glioma.jpg").first.click()  # the example
        wait_for_images(1)  # shown at once, before any classification
        assert page.get_by_text("Predicted:").count() == 0
        classify.click()
        page.get_by_text("Predicted: glioma").first.wait_for(timeout=60_000)
        wait_for_images(2)  # the heatmap, after the answer
        page.get_by_text("About the heatmap").first.wait_for(timeout=5_000)
        page.screenshot(path=str(artifacts / "app-example.png"), full_page=True)

        shown = served.first.get_attribute("src")
        page.get_by_role("button", name="Clear").first.click()  # the example goes; the answer with it
        page.locator("input[type=file]").first.set_input_files(str(real_images("Testing", "pituitary", 1)[0]))
        page.wait_for_function("s => (i => i !== null && i.src !== s)(document.querySelector(\"img[src*='/file=']\"))", arg=shown,
                               timeout=60_000)  # the new slice's preview replaced the old
        classify.click()
        page.get_by_text("Predicted: pituitary").first.wait_for(timeout=60_000)
        page.screenshot(path=str(artifacts / "app-one-slice.png"), full_page=True)
        browser.close()
    assert (artifacts / "app-example.png").stat().st_size > 10_000 and (artifacts / "app-one-slice.png").stat().st_size > 10_000


@pytest.mark.slow
def test_browser_whole_scan(served_app, mni_path):
    """The Whole scan tab in a real browser: upload a volume, and the curve, the summary and the middle slice
    with its answer and heatmap appear; the slider moves to another slice."""
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(served_app, wait_until="load")
        page.get_by_role("tab", name="Whole scan").click()
        page.locator("#scan-upload input[type=file]").set_input_files(str(mni_path))
        page.get_by_text("axial slices through the head").first.wait_for(timeout=120_000)
        answer = page.get_by_text("Predicted: notumor").first
        answer.wait_for(timeout=60_000)
        page.wait_for_function("document.querySelectorAll(\"img[src*='/file=']\").length >= 1", timeout=60_000)
        page.screenshot(path=str(artifacts / "app-whole-scan.png"), full_page=True)
        slider = page.get_by_label("number input for Slice")
        slider.fill("60")
        slider.press("Enter")
        page.get_by_text("Slice 60 (level").first.wait_for(timeout=60_000)
        browser.close()
    assert (artifacts / "app-whole-scan.png").stat().st_size > 20_000


def test_domain_check_on_offline_images():
    """The bundled model's check: real slices pass, photos, documents, noise and blanks are caught."""
    from benchlib import ood_report

    report = ood_report(load_predictor(BUNDLED_MODEL), [str(p) for c in CLASSES for p in real_images("Testing", c, 3)])
    # 15 of the 16 caught, as by the bundled model; the one it may miss is what image statistics cannot
    # tell from a slice: a gray photo with a dark region and a low energy score
    assert report["non_mri_images"] == 16 and len(report["non_mri_missed"]) <= 1, report["non_mri_missed"]
    assert set(report["non_mri_missed"]) <= {"gray china.jpg", "gray flower.jpg"}, report["non_mri_missed"]
    assert report["mri_wrongly_flagged"] <= 1 / 12
