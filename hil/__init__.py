"""Hardware-in-the-loop harness for the column firmware and the site gateway."""
