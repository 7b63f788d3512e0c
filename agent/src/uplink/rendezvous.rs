//! Rendezvous (highest random weight) hashing: the order in which one agent tries the
//! aggregators it is configured with. Pure: no I/O, no clock, no randomness.
//!
//! Every (agent id, aggregator address) pair gets a weight; an agent tries its aggregators by
//! falling weight. So a fleet spreads evenly over the aggregators, an agent keeps its first
//! choice for as long as that aggregator is listed, removing an aggregator moves only the agents
//! whose first choice it was (each to its own second choice, spread evenly again), and adding
//! one takes about `1 / (n + 1)` of every other's agents. No agent needs to know any other agent
//! or talk to anyone to agree on this.
//!
//! The weight must be the same on every platform and in every release, or a fleet upgraded in
//! parts would reshuffle: it is the first 8 bytes (big-endian) of SHA-256 (FIPS 180-4, from
//! `ring`) over `len(agent id)` as 8 bytes big-endian, the agent id's UTF-8 bytes and the
//! address's UTF-8 bytes exactly as configured. The length prefix makes the pair unambiguous
//! ("ab" + "c:1" differs from "a" + "bc:1"). Equal weights, which SHA-256 makes practically
//! impossible, fall back to the address's byte order so the order is still total. It must not
//! use `std`'s `DefaultHasher`, whose output may change between Rust releases.

/// The weight of `address` for `agent_id`: higher is preferred.
pub fn weight(agent_id: &str, address: &str) -> u64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&(agent_id.len() as u64).to_be_bytes());
    context.update(agent_id.as_bytes());
    context.update(address.as_bytes());
    let digest = context.finish();
    let first: [u8; 8] = digest.as_ref()[..8]
        .try_into()
        .expect("SHA-256 is 32 bytes");
    u64::from_be_bytes(first)
}

/// `addresses` in the order `agent_id` tries them: by falling [`weight`], then by address.
/// The order of `addresses` itself does not matter.
pub fn order(agent_id: &str, addresses: &[String]) -> Vec<String> {
    let mut weighted: Vec<(u64, &String)> = addresses
        .iter()
        .map(|address| (weight(agent_id, address), address))
        .collect();
    weighted.sort_by(|(w1, a1), (w2, a2)| w2.cmp(w1).then_with(|| a1.cmp(a2)));
    weighted
        .into_iter()
        .map(|(_, address)| address.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn agent_ids(n_agents: usize) -> Vec<String> {
        (0..n_agents).map(|idx| format!("edge-{idx:04}")).collect()
    }

    fn addresses(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| format!("{name}:9480")).collect()
    }

    /// Each agent's first choice.
    fn first_choices(ids: &[String], addresses: &[String]) -> BTreeMap<String, String> {
        ids.iter()
            .map(|id| (id.clone(), order(id, addresses)[0].clone()))
            .collect()
    }

    #[test]
    fn the_weight_is_pinned() {
        // The wire of this function is every fleet's layout: it must never change. Computed
        // once with this implementation and checked against `printf` + `sha256sum`:
        // printf '\0\0\0\0\0\0\0\6edge-1agg-a:9480' | sha256sum
        assert_eq!(weight("edge-1", "agg-a:9480"), 0x39af_2b59_a510_7513);
        assert_ne!(weight("ab", "c:1"), weight("a", "bc:1"));
    }

    #[test]
    fn the_order_is_deterministic_and_independent_of_the_list_order() {
        let forward = addresses(&["a", "b", "c", "d"]);
        let mut backward = forward.clone();
        backward.reverse();
        for id in agent_ids(100) {
            let first = order(&id, &forward);
            assert_eq!(first, order(&id, &forward));
            assert_eq!(first, order(&id, &backward));
            let mut sorted = first.clone();
            sorted.sort();
            assert_eq!(sorted, forward, "a permutation of the list");
        }
    }

    #[test]
    fn a_thousand_agents_spread_evenly_over_three_aggregators() {
        let ids = agent_ids(1000);
        let aggregators = addresses(&["a", "b", "c"]);
        let mut n_per_aggregator: BTreeMap<String, usize> = BTreeMap::new();
        for first in first_choices(&ids, &aggregators).into_values() {
            *n_per_aggregator.entry(first).or_default() += 1;
        }
        assert_eq!(n_per_aggregator.len(), 3, "{n_per_aggregator:?}");
        for (aggregator, n_agents) in &n_per_aggregator {
            // 33 % ± 5 %.
            assert!(
                (283..=383).contains(n_agents),
                "{aggregator} is the first choice of {n_agents} of 1000 agents: {n_per_aggregator:?}"
            );
        }
        // The second choices of one aggregator's agents spread evenly over the others too: that
        // is where they go when it fails.
        let mut n_second: BTreeMap<String, usize> = BTreeMap::new();
        for id in &ids {
            let choices = order(id, &aggregators);
            if choices[0] == aggregators[0] {
                *n_second.entry(choices[1].clone()).or_default() += 1;
            }
        }
        let n_moving = n_per_aggregator[&aggregators[0]];
        for (aggregator, n_agents) in &n_second {
            let share = *n_agents as f64 / n_moving as f64;
            assert!(
                (0.4..=0.6).contains(&share),
                "{aggregator} is second to {n_agents} of {n_moving}: {n_second:?}"
            );
        }
    }

    #[test]
    fn removing_an_aggregator_moves_only_its_own_agents() {
        let ids = agent_ids(1000);
        let before = first_choices(&ids, &addresses(&["a", "b", "c"]));
        let after = first_choices(&ids, &addresses(&["a", "c"]));
        let mut n_moved = 0;
        for id in &ids {
            if before[id] == "b:9480" {
                n_moved += 1;
                assert_ne!(after[id], "b:9480");
            } else {
                assert_eq!(after[id], before[id], "{id} moved without cause");
            }
        }
        assert!(n_moved > 0);
    }

    #[test]
    fn adding_an_aggregator_takes_about_a_quarter_of_each() {
        let ids = agent_ids(1000);
        let before = first_choices(&ids, &addresses(&["a", "b", "c"]));
        let after = first_choices(&ids, &addresses(&["a", "b", "c", "d"]));
        for old in addresses(&["a", "b", "c"]) {
            let agents: Vec<&String> = ids.iter().filter(|id| before[*id] == old).collect();
            let n_taken = agents.iter().filter(|id| after[**id] != old).count();
            for id in &agents {
                assert!(
                    after[*id] == old || after[*id] == "d:9480",
                    "{id} moved from {old} to {}, not to the new aggregator",
                    after[*id]
                );
            }
            let share = n_taken as f64 / agents.len() as f64;
            assert!(
                (0.18..=0.32).contains(&share),
                "the new aggregator took {n_taken} of {old}'s {} agents",
                agents.len()
            );
        }
    }

    #[test]
    fn one_aggregator_is_everyones_first_choice() {
        let one = addresses(&["only"]);
        for id in agent_ids(10) {
            assert_eq!(order(&id, &one), one);
        }
        assert!(order("edge-1", &[]).is_empty());
    }
}
