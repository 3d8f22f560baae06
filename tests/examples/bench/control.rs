//! Control plane: how long applying N reservations to fresh maps takes, through pf's library
//! (validation included), with batched map writes (`State::reserve_all`, BPF_MAP_UPDATE_BATCH)
//! and one reservation at a time (`State::reserve`, one syscall per entry) as the baseline.

use std::time::Instant;

use pf::{domain::spec::Reservation, kernel::bpffs::PinDir, kernel::state::State};
use pf_tests::kit::ScratchDir;
use serde_json::{Value, json};

use crate::{Profile, median, per_packet::filler};

fn timed(batched: bool, reservations: &[Reservation]) -> Result<f64, String> {
    let scratch = ScratchDir::claim(format!("/sys/fs/bpf/pf-bench-cp-{}", std::process::id()));
    let dir = PinDir::new(scratch.path());
    let mut state = State::open_for_write(&dir).map_err(|e| e.to_string())?;
    let start = Instant::now();
    if batched {
        state.reserve_all(reservations)
    } else {
        reservations.iter().try_for_each(|r| state.reserve(r))
    }
    .map_err(|e| format!("applying {} reservations: {e}", reservations.len()))?;
    let seconds = start.elapsed().as_secs_f64();
    if state.list().map_err(|e| e.to_string())?.len() != reservations.len() {
        return Err("the maps do not hold every reservation applied".into());
    }
    Ok(seconds)
}

pub fn run(profile: &Profile) -> Result<Vec<Value>, String> {
    println!();
    println!("control plane: time to apply N reservations to empty maps");
    println!(
        "{:>13}  {:<14} {:>10} {:>16} {:>18}",
        "reservations", "method", "ms", "reservations/s", "vs one at a time"
    );
    let mut results = Vec::new();
    for &size in profile.control_sizes {
        let reservations: Vec<Reservation> = (0..size).map(filler).collect();
        let mut one_at_a_time = f64::NAN;
        for (method, batched) in [("one at a time", false), ("batched", true)] {
            let runs = (0..profile.repetitions)
                .map(|_| timed(batched, &reservations))
                .collect::<Result<Vec<f64>, String>>()?;
            let m = median(&runs);
            if !batched {
                one_at_a_time = m;
            }
            println!(
                "{size:>13}  {method:<14} {:>10.1} {:>16.0} {:>17.1}x",
                m * 1e3,
                f64::from(size) / m,
                one_at_a_time / m
            );
            results.push(json!({
                "reservations": size,
                "method": method,
                "runs_seconds": runs,
                "median_seconds": m,
                "speedup_over_one_at_a_time": one_at_a_time / m,
            }));
        }
    }
    Ok(results)
}
