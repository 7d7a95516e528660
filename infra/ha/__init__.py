"""Head-node high availability: two recovery designs (standby, asg) and a drill that proves them.

Kept import-free: the Lambda package ships this package with only boto3 available.
"""
