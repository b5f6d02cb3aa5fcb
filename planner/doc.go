// Package planner makes hoard's decisions as deterministic functions over a
// snapshot of state: no goroutines, no I/O, no clock, so that the daemon,
// tests and a simulator (hoard sim) all drive the same code. It imports only
// chunkstore's types.
//
// # Hoarding
//
// Hoard chooses the boot working-set chunks a node should fetch ahead of
// time within its budget (hoard.budget), counted in stored bytes, the unit
// of the store quota. The budget covers the whole hoard: working-set chunks
// already held count against it as well as chunks to fetch, so a node never
// hoards past its budget. Images go most booted first, each working set in
// boot order, shared chunks counted once; the HoardPlan also accounts every
// image (working-set bytes, bytes held, bytes planned) for the daemon's
// status.
//
// # Profiles
//
// MergeProfiles merges the per-node profiles of one image into the cluster
// profile that hoarding uses: deterministic whatever the order the profiles
// arrived in, bounded, and treating a profile as a hint (bad indices are
// dropped, never trusted).
//
// # Eviction
//
// NewEviction builds the eviction policy store.eviction names: lru, arc or
// sharing (DefaultEviction). Each is a chunkstore.EvictionPolicy and an
// Eviction, which takes the observations some policies need: Touch from the
// read path, Forget when the store deletes a chunk outside eviction,
// SetWorkingSets when profiles change. Policies are the only stateful,
// concurrency-safe types here; their choices depend only on the calls they
// received, so a simulation replays exactly.
//
// # Simulation
//
// SimCache models a node's store (quota, watermarks, pins, LRU order) and
// evicts through any policy; NewWorkload generates a cluster workload
// (images in OS families, Zipf popularity, boots interleaved with scans) and
// RunSim plays it, measuring hit ratios and how many working sets stay whole.
// TestComparePolicies uses them to choose DefaultEviction.
//
// # Placement
//
// Place ranks nodes for booting an image by the working-set bytes they hold
// and their free slots.
package planner
