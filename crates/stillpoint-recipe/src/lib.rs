//! Recipes (Recipe CR) and Velero hook annotations: parse, validate, run workflows over a step runner.
//!
//! (Design note to be written with the crate's first real code.)
