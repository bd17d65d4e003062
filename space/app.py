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
from pathlib import Path

import gradio as gr

sys.path.insert(0, str(Path(__file__).resolve().parent))  # on a Space, hf_tumor/ sits beside this file
from hf_tumor.errors import UserError  # noqa: E402
from hf_tumor.explain import MAP_NOTE, CamExplainer, overlay  # noqa: E402
from hf_tumor.image_io import MAX_UPLOAD_BYTES, read_image  # noqa: E402
from hf_tumor.inference import Predictor, load_predictor  # noqa: E402
from hf_tumor.inference import default_model  # noqa: E402
from hf_tumor.reporting import OutputFolder, batch_table, limit_malloc_arenas, model_summary, verdict  # noqa: E402

MODEL_CARD_URL = "https://huggingface.co/{}"
EXAMPLES = Path(__file__).resolve().parent / "examples"
KEEP_FILES_S = 600  # uploads and results are deleted this long after they were made
PRIVACY = (
    f"**Privacy.** Uploads and results are deleted from the server within {KEEP_FILES_S // 60} minutes and "
    "when it restarts; nothing is logged. Of a DICOM file only the pixels are used: no header value "
    "(name, IDs, dates) is read out, shown or kept."
)


def build_demo(predictor: Predictor, explainer: CamExplainer) -> gr.Blocks:
    """The UI: one slice with probabilities and a heatmap, or many slices as a table and CSV."""
    summary = model_summary(predictor.model_dir)
    card = (MODEL_CARD_URL.format(predictor.source) if not Path(predictor.source).exists()
            else "the model card (README.md in the model folder)")
    split_names = {"test": "official test", "clean_test": "leak-free test"}
    figures = (", ".join(f"{split_names[name]}: {value:.2%}" for name, value in summary.items())
               if summary else "see the model card")

    outputs = OutputFolder(max_age_s=KEEP_FILES_S)

    def read(path: str | None):
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

    def classify(path: str | None):
        """Label and probabilities from the fast backend; the heatmap follows in its own step."""
        prediction = predictor.predict([read(path)])[0]
        return (prediction.probabilities if prediction.trusted else {}), verdict(prediction)

    def explain(path: str | None, opacity: float):
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

    def classify_many(paths: list[str] | None):
        if not paths:
            raise gr.Error("Upload one or more images first.")
        _, rows, text = batch_table(predictor.predict_files(paths), predictor.class_names)
        return rows, str(outputs.write("predictions.csv", text))

    # delete_cache: Gradio's own sweep of the uploads and outputs it keeps
    with gr.Blocks(title="hf-tumor: brain MRI tumor classifier", delete_cache=(KEEP_FILES_S, KEEP_FILES_S)) as demo:
        gr.Markdown(
            "# Brain tumor MRI classifier\n"
            f"Classifies one MRI slice as **{', '.join(predictor.class_names)}**, with a heatmap of "
            "what drove the prediction.\n\n"
            "> **Research tool, not a medical device.** Do not use it for diagnosis or treatment decisions.\n\n"
            f"Measured accuracy — {figures}. The official test split shares near-duplicates with the training "
            f"data; the leak-free figure is the honest one. Details: {card}."
        )
        with gr.Tab("One slice"):
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
            run.click(classify, upload, [probabilities, message], api_name="classify").success(
                explain, [upload, opacity], [heatmap, state], api_name="explain")
            opacity.change(reblend, [opacity, state], heatmap, api_name=False)
        with gr.Tab("Many slices"):
            many = gr.File(file_count="multiple", type="filepath", label="Images")
            run_many = gr.Button("Classify all", variant="primary")
            table = gr.Dataframe(headers=["file", "label", *predictor.class_names, "note"], label="Predictions")
            csv_file = gr.File(label="CSV")
            run_many.click(classify_many, many, [table, csv_file], api_name="classify_batch")
        gr.Markdown(PRIVACY)
    return demo


def main() -> None:
    limit_malloc_arenas()  # before Gradio starts its worker threads
    model = default_model()
    try:
        predictor = load_predictor(model, os.environ.get("HF_TUMOR_BACKEND", "auto"),
                                   revision=os.environ.get("HF_TUMOR_REVISION"))  # pin a Hub model's revision
        explainer = CamExplainer(predictor.model_dir)
    except UserError as err:
        sys.exit(str(err))
    except OSError as err:
        sys.exit(f"Cannot load the model '{model}' ({type(err).__name__}). Set HF_TUMOR_MODEL to a "
                 "model folder or a Hub repo id, or train one with `make train`.")
    print(predictor.describe(), flush=True)
    demo = build_demo(predictor, explainer)
    demo.queue(max_size=32, default_concurrency_limit=2)  # bounded: a full queue is refused, not grown
    # host and port left to Gradio: it reads GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (a Space sets 0.0.0.0)
    demo.launch(max_file_size=MAX_UPLOAD_BYTES, show_error=True)


if __name__ == "__main__":
    main()
