"""gradcam stage: reads params and runs gradcam.run (panels and localisation metrics).

Grad-CAM panels of the fine-tuned model on test images (plots/gradcam/<class>.png), the share of the maps'
energy inside the lungs, and, where lesion masks are known (demo), how well the maps localise them
(metrics/gradcam.json)."""
from cxr import quiet

quiet.tensorflow()  # first: TensorFlow reads its log level once, when the imports below load it
from cxr import gradcam, params  # noqa: E402
from cxr.errors import cli  # noqa: E402


@cli
def main() -> None:
    p = params.load()
    gradcam.run(p["gradcam"], params.dataset(p)["classes"], p["external"]["probes"]["box"])


if __name__ == "__main__":
    main()
