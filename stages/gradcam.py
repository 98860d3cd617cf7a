"""gradcam: Grad-CAM panels of the fine-tuned model on test images (plots/gradcam/<class>.png), and,
where lesion masks are known (demo), how well the maps localise them (metrics/gradcam.json)."""
import logging

import numpy as np

from cxr import atomic, data, gradcam, metrics, models, panels, params, paths
from cxr.errors import cli

log = logging.getLogger("gradcam")


@cli
def main() -> None:
    p = params.load()
    ds, cfg = params.dataset(p), p["gradcam"]
    classes = ds["classes"]
    test = data.load_splits(classes)["test"]
    model = models.load(paths.FINETUNED)
    target = None if cfg["class"] == "predicted" else np.full(len(test), classes.index(cfg["class"]))
    cams, proba = gradcam.heatmaps(model, test.images, target, min_side=cfg["min_side"])
    out = paths.PLOTS / "gradcam"
    with atomic.atomic_dir(out) as tmp:
        for k, name in enumerate(classes):
            chosen = panels.pick(test.labels, proba, k, cfg["per_class"])
            titles = [f"true {name}\npred {classes[proba[i].argmax()]} p={proba[i].max():.2f}" for i in chosen]
            explains = "predicted class" if target is None else cfg["class"]
            panels.figure(tmp / f"{metrics.class_key(name)}.png", test.images[chosen], cams[chosen], titles,
                          f"Grad-CAM ({explains}): test images of class {name}", cfg["alpha"])
    result = {"images": len(test), "layer": gradcam.target_layer(model, cfg["min_side"])[1]}
    if test.masks is not None:
        # Localisation is measured for the class whose lesion the mask marks: the true class.
        true_cams, _ = gradcam.heatmaps(model, test.images, test.labels, min_side=cfg["min_side"])
        result["localisation"] = gradcam.localisation(true_cams, test.masks)
        log.info("localisation on %d lesion images: %s", result["localisation"]["n"], result["localisation"])
    atomic.write_json(paths.METRICS / "gradcam.json", result)
    log.info("panels in %s", out)


if __name__ == "__main__":
    main()
