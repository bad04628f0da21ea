//! Comparisons, boolean logic, Max/Min and GatherND: the mask arithmetic that
//! recent PyTorch exporters emit around attention.

mod compare;
mod gather_nd;
mod minmax;

use super::Registry;

pub(crate) fn register(r: &mut Registry) {
    compare::register(r);
    r.add(gather_nd::GatherNd);
    r.add(minmax::MinMax { name: "Max", pick_max: true });
    r.add(minmax::MinMax { name: "Min", pick_max: false });
}
