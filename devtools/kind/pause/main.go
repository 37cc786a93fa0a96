// Command pause is the pod sandbox's first process: it holds the pod's namespaces open,
// reaps orphaned children, and exits on SIGINT or SIGTERM. containerd runs it as the image
// registry.k8s.io/pause, which this project builds here because no registry is reachable.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		// Reap every exited child; a shared-PID pod re-parents orphans to this process.
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
