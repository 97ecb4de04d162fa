//! Any bytes through parse → validate → plan: must never panic (invariant 7).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint_recipe::{PlanOptions, ValidateOptions, check_any_source, plan_workflow};

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let (recipe, _) = check_any_source(&source, &ValidateOptions::default());
    if let Some(recipe) = recipe {
        for workflow in &recipe.workflows {
            let _ = plan_workflow(&recipe, &workflow.name.value, &PlanOptions::default());
        }
    }
});
