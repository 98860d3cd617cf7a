"""external stage: reads params and runs external.run (external validation sets and shortcut probes).

The fine-tuned model, without retraining, on each set of `external.sets` (metrics/external/<set>.json, ROC
points in plots/external/<set>.json), and on the test split with the lung region hidden and with only it shown
(metrics/external/probes.json)."""
from cxr import quiet

quiet.tensorflow()  # first: TensorFlow reads its log level once, when the imports below load it
from cxr import external, params, sources  # noqa: E402
from cxr.errors import cli  # noqa: E402


@cli
def main() -> None:
    p = params.load(sources=sources.SOURCES)  # external sets name registered sources
    external.run(p["external"], p["evaluate"], p["clean"], params.dataset(p)["classes"], dataset=p["dataset"],
                 download_cfg=p["download"])


if __name__ == "__main__":
    main()
