//! Prometheus helpers both sides use: registries with fixed labels, and a
//! stable label order in what they export.

use prometheus::{Registry, proto::LabelPair};

/// A registry whose every series carries `name="value"`.
pub fn labelled_registry(name: &str, value: &str) -> Registry {
    labels_registry(&[(name, value)])
}

/// A registry whose every series carries these labels.
pub fn labels_registry(labels: &[(&str, &str)]) -> Registry {
    let labels = labels.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
    Registry::new_custom(None, Some(labels)).expect("valid registry labels")
}

/// Registers `c` in `r` and hands it back (metric names are fixed and unique).
pub fn registered<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

/// Sorts every series' labels by name: the registry's own labels come
/// from a map, in no fixed order, and a stable order is easier to diff and
/// grep.
pub fn sort_labels(families: &mut [prometheus::proto::MetricFamily]) {
    for family in families {
        for metric in family.mut_metric() {
            let mut pairs: Vec<LabelPair> = metric.get_label().to_vec();
            pairs.sort_by(|a, b| a.name().cmp(b.name()));
            metric.set_label(pairs);
        }
    }
}
