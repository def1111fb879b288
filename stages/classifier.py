"""Stage `classifier`: the feature extractor that FID / IS / KID use for this study's dataset.

    python -m stages.classifier [--params params.yaml]

digits: trains the small CNN classifier on the prepared digits train split (seeded), reports its
test accuracy, and saves models/classifier/classifier.pt, registered with torch-fidelity at
evaluation time (penultimate features for FID / KID, logits for IS).
cifar10 / folder: checks that torch-fidelity's inception-v3-compat weights are available
(evaluate.inception_weights when offline), so a missing file stops the study before training.
Writes models/classifier/info.json either way.
"""

from __future__ import annotations

from stages import _common

MIN_ACCURACY = 0.95


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("classifier", "Train (digits) or check (cifar10) the FID / IS feature "
                       "extractor.", folders=("data",),
                       out=("models/classifier", "folder for classifier.pt and info.json"))
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.core.io import write_json
        from pipeline.data.datasets import load_prepared, prepared_path
        from pipeline.measure import digits_classifier, extractors

        dataset = params.data.dataset
        extractor = extractors.extractor_name(dataset, params.evaluate.feature_extractor)
        info = {"dataset": dataset, "extractor": extractor}
        if extractor == extractors.DIGITS_EXTRACTOR:
            train_x, train_y, _ = load_prepared(prepared_path(args.data, dataset, "train"))
            test_x, test_y, _ = load_prepared(prepared_path(args.data, dataset, "test"))
            model = digits_classifier.train_digits_classifier(train_x, train_y,
                                                       steps=params.evaluate.classifier_steps,
                                                       seed=params.data.seed)
            accuracy = digits_classifier.classifier_accuracy(model, test_x, test_y)
            digits_classifier.save_classifier(model, args.out / digits_classifier.CLASSIFIER_FILE)
            info["test_accuracy"] = accuracy
            print(f"digits classifier: test accuracy {accuracy:.4f} "
                  f"({len(test_y)} images) -> {args.out / digits_classifier.CLASSIFIER_FILE}")
            if accuracy < MIN_ACCURACY:
                print(f"warning: accuracy below {MIN_ACCURACY:.0%}; FID / IS on digits will be "
                      "noisy (raise evaluate.classifier_steps)")
        else:  # fails now if the extractor cannot be imported or its weights are missing
            _, weights = extractors.resolve_extractor(dataset, params.evaluate, args.out,
                                                   params.data.download)
            if extractor == extractors.INCEPTION_EXTRACTOR:
                info["weights"] = weights or "(downloaded by torch-fidelity)"
            print(f"{dataset}: FID / IS use the feature extractor {extractor}"
                  + (f" with weights {info['weights']}" if "weights" in info else ""))
        write_json(args.out / "info.json", info)
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
