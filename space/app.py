"""hf-tumor Gradio Space: `python space/app.py` (local) or a Hugging Face Space (Gradio SDK).

Environment: HF_TUMOR_MODEL (Hub id or folder; default: the model bundled in the repository),
HF_TUMOR_REVISION (pin a Hub model to a branch, tag or commit; a push pins the commit it made),
HF_TUMOR_BACKEND (auto, onnx-int8, onnx or torch; auto: the fastest whose ONNX parity check passed),
HF_TUMOR_EXAMPLES (a folder of example slices; default: examples/ beside this file, which a push
stages). Host and port are Gradio's own GRADIO_SERVER_NAME (default 127.0.0.1; a Space sets 0.0.0.0)
and GRADIO_SERVER_PORT (default 7860).
"""

from __future__ import annotations

import os
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # on a Space, hf_tumor/ sits beside this file
from hf_tumor.errors import UserError  # noqa: E402
from hf_tumor.serving.explain import MAP_NOTE, CamExplainer, overlay  # noqa: E402
from hf_tumor.serving.image_io import read_image  # noqa: E402
from hf_tumor.serving.inference import Predictor, load_predictor  # noqa: E402
from hf_tumor.serving.inference import default_model  # noqa: E402
from hf_tumor.serving.reporting import OutputFolder, batch_table, limit_malloc_arenas, model_summary, verdict  # noqa: E402
from hf_tumor.serving.scan import MAX_SCAN_BYTES, PLANES, ScanResult, load_scan, predict_scan, summary_lines  # noqa: E402
from hf_tumor.serving.volumes import ChoiceNeeded  # noqa: E402

MODEL_CARD_URL = "https://huggingface.co/{}"
EXAMPLES = Path(__file__).resolve().parent / "examples"
CLASS_COLOURS = ("red", "orange", "green", "blue", "purple", "brown")  # in class order
KEEP_FILES_S = 600  # uploads and results are deleted this long after they were made
PRIVACY = (
    f"**Privacy.** Uploads and results are deleted from the server within {KEEP_FILES_S // 60} minutes and "
    "when it restarts (a scan's files as soon as they are read); nothing is logged. Of a DICOM file only "
    "the pixels and their geometry are used: no other header value (name, IDs, dates) is shown or kept."
)


class LazyExplainer:
    """The heatmap's explainer, loaded at the first heatmap: with an ONNX backend the app starts, and
    answers (/classify, batches, scans), without importing PyTorch; only the heatmap needs it."""

    def __init__(self, model_dir: str | Path):
        self.model_dir, self._explainer, self._lock = model_dir, None, threading.Lock()

    def heatmap(self, pixel_values, class_index: int):
        with self._lock:  # two first requests at once load it once
            if self._explainer is None:
                try:
                    self._explainer = CamExplainer(self.model_dir)
                except (UserError, OSError, ImportError) as err:  # weights missing or corrupt, torch absent
                    raise gr.Error(f"The heatmap is unavailable: {err}") from err
        return self._explainer.heatmap(pixel_values, class_index)


# ------------------------------------------------------------------ handlers (predictor, explainer, outputs bound)


def read(path: str | None):
    """The uploaded slice, or the reader's message as a Gradio error."""
    if path is None:
        raise gr.Error("Upload an image first.")
    try:
        return read_image(path)
    except UserError as err:
        raise gr.Error(str(err)) from None


def preview(path: str | None):
    """The upload as the model sees it (a DICOM rendered), shown before anything is classified; the
    previous slice's answer and heatmap are cleared."""
    image = None
    try:
        image = read_image(path) if path is not None else None
    except UserError as err:
        gr.Warning(str(err))
    return image, None, "", None


def classify(predictor: Predictor, path: str | None):
    """Label and probabilities from the fast backend; the heatmap follows in its own step."""
    prediction = predictor.predict([read(path)])[0]
    return (prediction.probabilities if prediction.trusted else {}), verdict(prediction)


def explain(predictor: Predictor, explainer: CamExplainer | LazyExplainer, path: str | None, opacity: float):
    image = read(path)
    x = predictor.preprocess([image])
    prediction = predictor.predict([image], x)[0]
    if not prediction.trusted:  # a map of a label that is not given would explain nothing
        return None, None
    cam = explainer.heatmap(x, predictor.class_names.index(prediction.label))
    return overlay(image, cam, opacity), (image, cam)


def reblend(opacity: float, state):
    if state is None:
        return None
    image, cam = state
    return overlay(image, cam, opacity)


def classify_many(predictor: Predictor, outputs: OutputFolder, paths: list[str] | None):
    if not paths:
        raise gr.Error("Upload one or more images first.")
    _, rows, text = batch_table(predictor.predict_files(paths), predictor.class_names)
    return rows, str(outputs.write("predictions.csv", text))


def read_scan(paths: list[str] | None):
    """Read an uploaded volume or series into memory and delete the upload at once (it may hold a
    patient's DICOM headers); the answers are made from the volume kept in the session."""
    if not paths:
        return None, None, ""
    try:
        volume = load_scan(paths, name=Path(paths[0]).name if len(paths) == 1 else "series")
    except ChoiceNeeded as err:
        raise gr.Error(f"{err}. The app reads one 3-D volume or one DICOM series per upload: upload a file that "
                       "holds only one, or choose with `hf-tumor predict`.") from None
    except UserError as err:
        raise gr.Error(str(err)) from None
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)
    shape, zooms = volume.data.shape, " x ".join(f"{z:g}" for z in volume.zooms)
    return None, volume, f"Read **{volume.name}**: {' x '.join(map(str, shape))} voxels of {zooms} mm. Classifying..."


def classify_scan(predictor: Predictor, outputs: OutputFolder, volume, plane: str):
    if volume is None:
        raise gr.Error("Upload a scan first: a NIfTI file, a zipped DICOM series, or the DICOM files of one series.")
    try:
        result = predict_scan(predictor, volume, plane)
    except UserError as err:
        raise gr.Error(str(err)) from None
    summary = result.summary()
    best = max(result.slices, key=lambda s: (s.prediction.trusted, -abs(s.slice.level - 0.5)))
    first, last = summary["head_indices"]
    csv_path = outputs.write(f"{Path(volume.name).name.split('.')[0] or 'scan'}-{plane}.csv", result.csv_text())
    head, *rest = summary_lines(summary)
    return ("\n".join([f"**{head}**", "", *(f"- {line}" for line in rest)]), pd.DataFrame(result.plot_rows()),
            gr.Slider(first, last, value=best.slice.index, step=1, visible=True), str(csv_path), result)


def recut(predictor: Predictor, outputs: OutputFolder, volume, plane: str):
    """Another plane of the scan already read; nothing to do before a scan is there."""
    return classify_scan(predictor, outputs, volume, plane) if volume is not None else (gr.skip(),) * 5


def show_slice(predictor: Predictor, explainer: CamExplainer | LazyExplainer, index: float, opacity: float,
               result: ScanResult | None):
    if result is None:
        return None, ""
    chosen = min(result.slices, key=lambda s: abs(s.slice.index - index))
    image, prediction = chosen.slice.image, chosen.prediction
    text = f"Slice {chosen.slice.index} (level {chosen.slice.level:.2f}): {verdict(prediction)}"
    if not prediction.trusted:
        return image, text
    cam = explainer.heatmap(predictor.preprocess([image]), predictor.class_names.index(prediction.label))
    return overlay(image, cam, opacity), text


# ------------------------------------------------------------------ the page, tab by tab


def bound(handler: Callable, *args: Any) -> Callable:
    """``handler`` with its first arguments given (the predictor, the explainer, the output folder): the
    rest are the event's inputs. Its docstring stays, as the API page's description of the endpoint."""
    event_handler = partial(handler, *args)
    event_handler.__doc__ = handler.__doc__
    return event_handler


def header(predictor: Predictor) -> str:
    """What the model does, that it is no medical device, and its measured accuracy."""
    summary = model_summary(predictor.model_dir)
    card = (MODEL_CARD_URL.format(predictor.source) if not Path(predictor.source).exists()
            else "the model card (README.md in the model folder)")
    split_names = {"test": "official test", "clean_test": "leak-free test"}
    figures = (", ".join(f"{split_names[name]}: {value:.2%}" for name, value in summary.items())
               if summary else "see the model card")
    return ("# Brain tumor MRI classifier\n"
            f"Classifies an MRI slice, or every slice of a scan, as **{', '.join(predictor.class_names)}**, "
            "with a heatmap of what drove the prediction.\n\n"
            "> **Research tool, not a medical device.** Do not use it for diagnosis or treatment decisions.\n\n"
            f"Measured accuracy — {figures}. The official test split shares near-duplicates with the training "
            f"data; the leak-free figure is the honest one. Details: {card}.")


def one_slice_tab(predictor: Predictor, explainer: CamExplainer | LazyExplainer) -> None:
    """One slice: its probabilities (/classify), then the heatmap of its label (/explain)."""
    with gr.Row():
        with gr.Column():
            # a File, not an Image: our own reader decodes it, safely, with clear messages for bad files
            upload = gr.File(label="MRI slice: JPEG, PNG or DICOM (.dcm)", type="filepath")
            shown = gr.Image(label="Your slice", interactive=False, height=320)
            run = gr.Button("Classify", variant="primary")
            folder = Path(os.environ.get("HF_TUMOR_EXAMPLES") or EXAMPLES)
            files = sorted(str(p) for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".dcm"))
            if files:
                gr.Examples(files[:12], inputs=upload, label="Examples: click one, then Classify")
        with gr.Column():
            probabilities = gr.Label(num_top_classes=len(predictor.class_names), label="Probabilities")
            message = gr.Markdown()
            heatmap = gr.Image(label="Where the evidence for the label lies", interactive=False, height=320)
            opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Heatmap opacity")
            gr.Markdown(MAP_NOTE)
    state = gr.State()
    upload.change(preview, upload, [shown, probabilities, message, heatmap], api_name=False)
    run.click(bound(classify, predictor), upload, [probabilities, message], api_name="classify").success(
        bound(explain, predictor, explainer), [upload, opacity], [heatmap, state], api_name="explain")
    opacity.change(reblend, [opacity, state], heatmap, api_name=False)


def many_slices_tab(predictor: Predictor, outputs: OutputFolder) -> None:
    """Many slices: a table and its CSV (/classify_batch)."""
    many = gr.File(file_count="multiple", type="filepath", label="Images")
    run_many = gr.Button("Classify all", variant="primary")
    table = gr.Dataframe(headers=["file", "label", *predictor.class_names, "note"], label="Predictions")
    csv_file = gr.File(label="CSV")
    run_many.click(bound(classify_many, predictor, outputs), many, [table, csv_file], api_name="classify_batch")


def whole_scan_tab(predictor: Predictor, explainer: CamExplainer | LazyExplainer, outputs: OutputFolder) -> None:
    """A whole scan: read it (/read_scan), classify every slice along a plane (/classify_scan), and show one
    slice with its heatmap (/show_slice)."""
    colours = dict(zip(predictor.class_names, CLASS_COLOURS))  # named in the plot's label: its legend can be cut off
    with gr.Row():
        with gr.Column(scale=1):
            scan_files = gr.File(file_count="multiple", type="filepath",
                                 label="A NIfTI volume (.nii, .nii.gz), a zipped DICOM series, or one series' DICOM files",
                                 elem_id="scan-upload")
            plane = gr.Radio(list(PLANES), value="axial", label="Cut along")
            run_scan = gr.Button("Classify scan", variant="primary")
            scan_text = gr.Markdown()
            scan_csv = gr.File(label="CSV, one row per slice")
        with gr.Column(scale=2):
            curve = gr.LinePlot(x="slice", y="probability", color="class", y_lim=[0, 1], height=320,
                                color_map=colours, label="Class probabilities by slice: " + ", ".join(
                                    f"{c} {name}" for name, c in colours.items()) + " (flagged slices carry no label)")
            slider = gr.Slider(0, 1, step=1, label="Slice", visible=False)
            slice_view = gr.Image(label="The slice, with the heatmap of its label", interactive=False, height=360)
            slice_text = gr.Markdown()
            scan_opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Heatmap opacity")
    volume_state = gr.State(time_to_live=KEEP_FILES_S)  # the scan lives in memory, not on disk
    result_state = gr.State(time_to_live=KEEP_FILES_S)
    scan_outputs = [scan_text, curve, slider, scan_csv, result_state]
    view = dict(fn=bound(show_slice, predictor, explainer), inputs=[slider, scan_opacity, result_state],
                outputs=[slice_view, slice_text])
    classify_this = bound(classify_scan, predictor, outputs)
    # the upload is cleared once read: the server deleted it, the volume is kept in the session
    scan_files.upload(read_scan, scan_files, [scan_files, volume_state, scan_text], api_name="read_scan").success(
        classify_this, [volume_state, plane], scan_outputs, api_name=False).success(**view, api_name=False)
    run_scan.click(classify_this, [volume_state, plane], scan_outputs, api_name="classify_scan").success(
        **view, api_name="show_slice")
    plane.input(bound(recut, predictor, outputs), [volume_state, plane], scan_outputs, api_name=False).success(
        **view, api_name=False)
    gr.on([slider.input, scan_opacity.input], **view, api_name=False, trigger_mode="always_last")


def build_demo(predictor: Predictor, explainer: CamExplainer | LazyExplainer) -> gr.Blocks:
    """The UI: one slice with probabilities and a heatmap, many slices as a table and CSV, or a whole scan."""
    outputs = OutputFolder(max_age_s=KEEP_FILES_S)
    # delete_cache: Gradio's own sweep of the uploads and outputs it keeps
    with gr.Blocks(title="hf-tumor: brain MRI tumor classifier", delete_cache=(KEEP_FILES_S, KEEP_FILES_S)) as demo:
        gr.Markdown(header(predictor))
        with gr.Tab("One slice"):
            one_slice_tab(predictor, explainer)
        with gr.Tab("Many slices"):
            many_slices_tab(predictor, outputs)
        with gr.Tab("Whole scan"):
            whole_scan_tab(predictor, explainer, outputs)
        gr.Markdown(PRIVACY)
    return demo


def main() -> None:
    limit_malloc_arenas()  # before Gradio starts its worker threads
    model = default_model()
    try:
        predictor = load_predictor(model, os.environ.get("HF_TUMOR_BACKEND", "auto"),
                                   revision=os.environ.get("HF_TUMOR_REVISION"))  # pin a Hub model's revision
        explainer = LazyExplainer(predictor.model_dir)
    except UserError as err:
        sys.exit(str(err))
    except OSError as err:
        sys.exit(f"Cannot load the model '{model}' ({type(err).__name__}). Set HF_TUMOR_MODEL to a "
                 "model folder or a Hub repo id, or train one with `make train`.")
    print(predictor.describe(), flush=True)
    demo = build_demo(predictor, explainer)
    demo.queue(max_size=32, default_concurrency_limit=2)  # bounded: a full queue is refused, not grown
    # host and port left to Gradio: it reads GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (a Space sets 0.0.0.0)
    # a slice over image_io's smaller limit is refused by our own reader, with its own message
    demo.launch(max_file_size=MAX_SCAN_BYTES, show_error=True)


if __name__ == "__main__":
    main()
