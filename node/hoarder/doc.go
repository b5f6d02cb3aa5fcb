// Package hoarder is the proactive half of hoard ("scatter hoarding"): each
// daemon keeps the boot working set of every image it knows local, ahead of
// the first boot, within a budget, so that a boot anywhere in the cluster
// reads from its own disk.
//
// # The loop
//
// Run plans once at start, then after every Config.Interval (counted from
// the end of the previous pass) and soon after Kick (the node kicks when the
// catalog or a profile changes; kicks coalesce: one kick or many during a
// pass give one more pass). A pass asks the Source for every known image and
// its merged boot working set (manifest entry indices in boot order), turns
// each into a planner.Image (zero entries and out-of-range indices are
// dropped: a profile is a hint), and calls planner.Hoard, which ranks images
// most booted first and keeps each working set a prefix in boot order. The
// pass then fetches the plan's chunks in plan order, each distinct chunk
// once, by any (manifest, index) that holds it, through Source.Fetch: the
// node's own read path (local store, else peers, else the origin through the
// cluster's designated fetcher), so hoarding never sends a node to the
// origin on its own and the cluster still fetches each chunk from the origin
// once. At most Config.Concurrency fetches are in flight.
//
// A fetch that fails is counted, logged at debug, and summarized at warn once
// per pass; it never stops the pass. A pass that tried to fetch and fetched
// nothing backs off: kicks wait for the next tick.
//
// # Yielding and rate
//
// VM reads always go first: before each fetch the hoarder waits while
// Source.Busy reports that VM reads are waiting on fetches (polling every
// 25 ms, cancellable). Hoarding moves at most Config.Rate raw bytes per
// second (a token bucket whose burst is the largest chunk of the plan); 0 is
// unlimited.
//
// # Budget
//
// Config.Budget (hoard.budget) is in stored bytes, the unit of the store
// quota: the whole hoard (working-set chunks already held, and those to
// fetch) fits within it. The stored size of a chunk is estimated as its raw
// size times Source.StoredRatio. A budget of 0 turns fetching off; the
// hoarder still plans, so that Status accounts every image's working set.
//
// # Status
//
// Status is the last plan and the progress since: per image (most booted
// first) the raw bytes of its working set (working_set_bytes in hoard image
// ls) and how many of them are local (working_set_local_bytes), measured
// with Source.Has at plan time and raised as the hoarder's own fetches land
// (a chunk a VM read brings in is seen at the next plan); the plan's totals;
// raw bytes hoarded by source (local, peer, origin) since start; whether a
// pass is running or yielding; and the last error.
//
// # Prefetch
//
// Prefetch (hoard image prefetch NAME [--full]) fetches one image's working
// set, or every non-zero entry of it, now: outside the budget and the rate,
// but still yielding to VM reads. The node pins the image afterwards.
package hoarder
