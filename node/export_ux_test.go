package node

import "time"

// Streamed answers report progress often in tests, so that short imports
// show several steps.
func init() { progressInterval = 20 * time.Millisecond }
