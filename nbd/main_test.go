package nbd

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when any goroutine is still running
// after they all returned: a server, connection or reply writer that
// outlives its Serve or its client.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
